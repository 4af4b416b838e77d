"""End to end on the embedded default model: lserve's greedy tokens equal transformers' exactly."""

from __future__ import annotations

import pytest

from lserve import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.passkey import FILLER, passkey_messages

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.\n",
    "In 1969, the first humans",
]
LONG_PROMPT = "Here is a long story about a lighthouse keeper. " + FILLER * 160 + "\nSummary:"
MAX_NEW = 24


def _greedy(max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def references(default_llm, hf_model) -> dict[str, list[int]]:
    tok = default_llm.get_tokenizer()
    return {p: hf_greedy(hf_model, tok.encode(p), MAX_NEW) for p in [*PROMPTS, LONG_PROMPT]}


def test_long_prompt_is_long(default_llm) -> None:
    assert len(default_llm.get_tokenizer().encode(LONG_PROMPT)) > 2000


@pytest.mark.parametrize("prompt", [*PROMPTS, LONG_PROMPT], ids=lambda p: p[:16])
def test_greedy_matches_transformers(default_llm, references, prompt: str) -> None:
    out = default_llm.generate(prompt, _greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == references[prompt]


def test_batch_of_mixed_lengths_matches_transformers(default_llm, references) -> None:
    prompts = [*PROMPTS, LONG_PROMPT]
    outs = default_llm.generate(prompts, _greedy(), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt == prompt
        assert out.outputs[0].token_ids == references[prompt], prompt[:30]
    assert default_llm.engine.core.kv_manager.num_free_pages == default_llm.engine.core.kv_manager.num_pages


def test_passkey_retrieval(default_llm) -> None:
    messages, key = passkey_messages(num_filler=100, seed=1234)
    out = default_llm.chat(messages, _greedy(12), use_tqdm=False)[0]
    assert 1800 <= len(out.prompt_token_ids) <= 2600
    assert key in out.outputs[0].text


def test_chunked_prefill_with_preemption_matches_one_at_a_time(default_llm, references) -> None:
    """A pool too small for the batch and a small token budget: same tokens, every page freed."""
    tiny = LLM(dtype="float32", device="cpu", page_size=16, num_kv_pages=24, max_num_batched_tokens=96)
    prompts = [*PROMPTS, "Tell me about " + FILLER * 12, "Describe this: " + FILLER * 10]
    expected = [tiny.generate(p, _greedy(), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    for p in PROMPTS:
        assert expected[PROMPTS.index(p)] == references[p]
    outs = tiny.generate(prompts, _greedy(), use_tqdm=False)
    core = tiny.engine.core
    assert core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert [o.outputs[0].token_ids for o in outs] == expected
    core.scheduler.check_invariants()
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
