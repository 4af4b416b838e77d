"""Qwen3, Gemma 3 (text) and sliding-window models (Gemma 3's interleaved local layers, Mistral's
`sliding_window`, Qwen2's `use_sliding_window`) against transformers, on tiny random HF folders.

Window convention (transformers' masking_utils.sliding_window_overlay, checked below): in a layer of
window W, key j is visible to query i iff j <= i and i - j < W, so a query sees itself and the W - 1
keys before it. Qwen2/Qwen3 layer i slides iff use_sliding_window and i >= max_window_layers (unless
the config lists `layer_types`); Gemma 3 layer i is global iff (i + 1) % sliding_window_pattern == 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.errors import ModelLoadError
from lserve.model.loader import read_arch_config, resolve_source
from tests.helpers_models import (
    GEMMA3_TINY,
    hf_config,
    hf_logits,
    hf_model,
    load_lserve,
    lserve_logits,
    random_ids,
    save_hf,
    save_word_tokenizer,
)

pytest.importorskip("transformers")

ATOL = 1e-4
RTOL = 1e-4
LOGPROB_ATOL = 2e-4  # as tests/test_logprobs.py
SEQ = 37  # odd, and three times Gemma's window of 12
PAGE = 16
GEMMA_W = GEMMA3_TINY["sliding_window"]  # 12

# name -> (family, hf_config overrides, seed)
MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "qwen3": ("qwen3", {}, 3),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}, 4),
    "gemma3": ("gemma3", {}, 5),
    "mistral-w8": ("mistral", {"sliding_window": 8}, 6),  # window smaller than a page
    "mistral-w24": ("mistral", {"sliding_window": 24}, 7),  # window over a page, not a multiple of it
    # layer 0 full, layers 1 and 2 sliding (transformers: i >= max_window_layers slides)
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1,
                               "num_hidden_layers": 3}, 8),
}

EXPECTED_WINDOWS: dict[str, tuple[int | None, ...]] = {
    "qwen3": (None, None),
    "qwen3-tied": (None, None),
    "gemma3": (12, 12, None, 12, 12, None),
    "mistral-w8": (8, 8),
    "mistral-w24": (24, 24),
    "qwen2-window": (None, 12, 12),
}

WINDOWED = ["gemma3", "mistral-w8", "mistral-w24", "qwen2-window"]
ENGINE_MODELS = ["qwen3", *WINDOWED]

PROMPT_LENS = (37, 90, 5, 61)  # mixed batch; 90 is over three times the largest window (24)
MAX_TOKENS = 16


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def hf_windows(config: Any) -> tuple[int | None, ...]:
    """The per-layer window transformers itself uses for `config` (its attention modules' own)."""
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: one window (or none) for every layer
        return (config.sliding_window,) * config.num_hidden_layers
    return tuple(config.sliding_window if t == "sliding_attention" else None for t in types)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """name -> (transformers model, HF folder with a word-level tokenizer), each built once."""
    made: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in made:
            family, overrides, seed = MODELS[name]
            ref = hf_model(hf_config(family, **overrides), seed=seed)
            folder = save_hf(ref, tmp_path_factory.mktemp(name))
            save_word_tokenizer(folder)
            made[name] = (ref, folder)
        return made[name]

    return get


# --- logits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(tiny, name: str) -> None:
    ref, folder = tiny(name)
    model = load_lserve(folder)
    ids = random_ids(SEQ, seed=21)
    assert_logits_match(lserve_logits(model, ids), hf_logits(ref, ids))
    if name == "qwen3-tied":
        assert model.config.tie_word_embeddings
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in set(f.keys())


def test_mistral_window_longer_sequence_matches_transformers(tiny) -> None:
    """Well past the window (and over several pages), an odd length."""
    ref, folder = tiny("mistral-w24")
    ids = random_ids(143, seed=22)
    assert_logits_match(lserve_logits(load_lserve(folder), ids), hf_logits(ref, ids))


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_prefix_logits_are_consistent(tiny, name: str) -> None:
    """Every prefix's last row equals the full sequence's row (causality, also across the window)."""
    ref, folder = tiny(name)
    model = load_lserve(folder)
    ids = random_ids(GEMMA_W + 3, seed=23)
    full = hf_logits(ref, ids)
    for n in (1, 2, GEMMA_W - 1, GEMMA_W, GEMMA_W + 1, GEMMA_W + 3):
        assert_logits_match(lserve_logits(model, ids[:n])[-1], full[n - 1])


def test_reference_is_sensitive_to_what_gemma3_must_get_right(tiny) -> None:
    """Negative controls on transformers' side: the window, the attention scale and the local RoPE
    theta each change the tiny Gemma's logits at SEQ tokens, so matching at 1e-4 checks all three."""
    ref, _ = tiny("gemma3")
    ids = random_ids(SEQ, seed=21)
    want = hf_logits(ref, ids)
    for change in ({"sliding_window": 1000}, {"query_pre_attn_scalar": GEMMA3_TINY["head_dim"]},
                   {"rope_local_base_freq": GEMMA3_TINY["rope_theta"]}):
        other = hf_model(hf_config("gemma3", **change), seed=MODELS["gemma3"][2])
        assert not torch.allclose(hf_logits(other, ids), want, atol=1e-2), change


@pytest.mark.parametrize("window", [8, 24])
def test_reference_window_convention(window: int) -> None:
    """transformers' window is 'i - j < W': rows 0..W-1 see every earlier key, row W loses key 0.
    (A negative control too: the windowed reference really differs from the full one.)"""
    ids = random_ids(SEQ, seed=24)
    windowed = hf_logits(hf_model(hf_config("mistral", sliding_window=window), seed=6), ids)
    full = hf_logits(hf_model(hf_config("mistral"), seed=6), ids)
    torch.testing.assert_close(windowed[:window], full[:window], atol=1e-6, rtol=0)
    assert not torch.allclose(windowed[window], full[window], atol=1e-2)
    assert not torch.allclose(windowed, full, atol=1e-2)


def test_gemma3_hub_style_config(tiny, tmp_path) -> None:
    """A transformers 4.x-style Gemma 3 config.json (rope_theta + rope_local_base_freq,
    sliding_window_pattern, no layer_types / rope_parameters) means the same model."""
    import transformers

    ref, folder = tiny("gemma3")
    legacy = Path(shutil.copytree(folder, tmp_path / "legacy"))
    cfg = json.loads((legacy / "config.json").read_text())
    for key in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        cfg.pop(key, None)
    cfg.update(rope_theta=GEMMA3_TINY["rope_theta"], rope_local_base_freq=GEMMA3_TINY["rope_local_base_freq"],
               rope_scaling=None, sliding_window_pattern=GEMMA3_TINY["sliding_window_pattern"])
    (legacy / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoConfig.from_pretrained(str(legacy))  # transformers reads it as the same model
    assert theirs.layer_types == ref.config.layer_types and theirs.rope_parameters == ref.config.rope_parameters
    arch, _ = read_arch_config(resolve_source(str(legacy), "auto"))
    assert arch.layer_windows == EXPECTED_WINDOWS["gemma3"]
    ids = random_ids(SEQ, seed=21)
    assert_logits_match(lserve_logits(load_lserve(legacy), ids), hf_logits(ref, ids))


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tiny, tmp_path) -> None:
    """A Gemma3ForConditionalGeneration folder: the text config under `text_config`, the text
    weights under `model.language_model.`, vision tensors beside them (skipped)."""
    from safetensors.torch import load_file, save_file

    ref, folder = tiny("gemma3")
    mm = tmp_path / "multimodal"
    mm.mkdir()
    text_cfg = json.loads((folder / "config.json").read_text())
    text_cfg.pop("architectures", None)
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text_cfg, "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "torch_dtype": "float32"}))
    weights = {("model.language_model." + k[len("model."):]): v for k, v in load_file(folder / "model.safetensors").items()}
    weights["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    weights["model.multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 8)
    save_file(weights, str(mm / "model.safetensors"))
    arch, _ = read_arch_config(resolve_source(str(mm), "auto"))
    assert arch.architecture == "Gemma3ForConditionalGeneration"
    assert arch.layer_windows == EXPECTED_WINDOWS["gemma3"]
    ids = random_ids(SEQ, seed=22)
    assert_logits_match(lserve_logits(load_lserve(mm), ids), hf_logits(ref, ids))


# --- architecture config ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_windows_and_attention_scale(tiny, name: str) -> None:
    ref, folder = tiny(name)
    arch, _ = read_arch_config(resolve_source(str(folder), "auto"))
    assert arch.architecture == ref.config.architectures[0]
    assert arch.layer_windows == EXPECTED_WINDOWS[name] == hf_windows(ref.config)
    scale = GEMMA3_TINY["query_pre_attn_scalar"] ** -0.5 if name == "gemma3" else arch.head_dim**-0.5
    assert arch.attention_scale == pytest.approx(scale, rel=1e-12)
    if name == "gemma3":
        assert arch.head_dim == GEMMA3_TINY["head_dim"] and arch.tie_word_embeddings


def _qwen2_windows(tmp_path: Path, edit=None, family: str = "qwen2",
                   **overrides: Any) -> tuple[tuple[int | None, ...], Any]:
    """lserve's layer windows for a Qwen2 (or Qwen3) config.json, optionally edited after saving, and
    the config transformers reads back from the same file."""
    import transformers

    hf_config(family, **overrides).save_pretrained(str(tmp_path))
    if edit is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        edit(cfg)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch, _ = read_arch_config(resolve_source(str(tmp_path), "dummy"))
    return arch.layer_windows, transformers.AutoConfig.from_pretrained(str(tmp_path))


def test_qwen2_sliding_layers_follow_max_window_layers(tmp_path) -> None:
    kw = dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, num_hidden_layers=5)
    windows, theirs = _qwen2_windows(tmp_path / "a", **kw)
    assert theirs.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 3
    assert windows == (None, None, 16, 16, 16) == hf_windows(theirs)
    # a 4.x config.json without layer_types: transformers derives the same list from max_window_layers
    windows, theirs = _qwen2_windows(tmp_path / "b", edit=lambda c: c.pop("layer_types"), **kw)
    assert windows == (None, None, 16, 16, 16) == hf_windows(theirs)


def test_qwen3_sliding_layers_follow_max_window_layers(tmp_path) -> None:
    windows, theirs = _qwen2_windows(tmp_path, family="qwen3", use_sliding_window=True, sliding_window=16,
                                     max_window_layers=1, num_hidden_layers=3)
    assert windows == (None, 16, 16) == hf_windows(theirs)


def test_qwen2_explicit_layer_types_win(tmp_path) -> None:
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    windows, theirs = _qwen2_windows(tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=2,
                                     num_hidden_layers=3, layer_types=types)
    assert theirs.layer_types == types
    assert windows == (16, None, 16) == hf_windows(theirs)


def test_qwen2_without_sliding_window_is_all_full(tmp_path) -> None:
    windows, theirs = _qwen2_windows(tmp_path / "saved")  # as transformers 5 saves it: sliding_window null
    assert windows == (None, None) == hf_windows(theirs)

    def hub_style(cfg: dict) -> None:  # e.g. Qwen2.5's: a window given but switched off
        cfg.pop("layer_types", None)
        cfg.update(use_sliding_window=False, sliding_window=4096, max_window_layers=1)

    windows, theirs = _qwen2_windows(tmp_path / "hub", edit=hub_style)
    assert theirs.sliding_window is None
    assert windows == (None, None) == hf_windows(theirs)


def test_mistral_without_window_is_all_full(tmp_path) -> None:
    hf_config("mistral").save_pretrained(str(tmp_path))
    arch, _ = read_arch_config(resolve_source(str(tmp_path), "dummy"))
    assert arch.layer_windows == (None, None)
    assert arch.attention_scale == pytest.approx(arch.head_dim**-0.5)


def test_unsupported_architecture_lists_the_new_families(tmp_path, tiny) -> None:
    _, folder = tiny("qwen3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as info:
        load_lserve(tmp_path, "dummy")
    msg = str(info.value)
    assert "FooForCausalLM" in msg and "\n" not in msg
    for supported in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert supported in msg, msg


# --- engine -----------------------------------------------------------------------------------------


@torch.no_grad()
def hf_greedy_tokens(ref: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored (the engine runs with ignore_eos): argmax of the
    full forward at every step (transformers' cached generate gives the same tokens on these models;
    this avoids its EOS handling)."""
    cache = ref.__dict__.setdefault("_greedy_cache", {})  # per reference model, shared by the tests
    key = (tuple(prompt), n)
    if key not in cache:
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(hf_logits(ref, torch.tensor(seq))[-1].argmax()))
        cache[key] = seq[len(prompt):]
    return cache[key]


def prompts_for(lens: tuple[int, ...] = PROMPT_LENS, seed: int = 30) -> list[list[int]]:
    return [random_ids(n, seed=seed + i).tolist() for i, n in enumerate(lens)]


def tiny_llm(folder: Path, **kw: Any) -> LLM:
    kw.setdefault("page_size", PAGE)
    kw.setdefault("max_num_seqs", 8)
    return LLM(model=str(folder), dtype="float32", device="cpu", attention_backend="torch", **kw)


def check_against_transformers(ref: Any, prompts: list[list[int]], outs: list[Any], n: int,
                               prompt_logprobs: bool = False) -> None:
    """Same greedy tokens as transformers, and each token's log-probability (and optionally every
    prompt token's) equal to log_softmax of transformers' logits."""
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        comp = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert comp.token_ids == hf_greedy_tokens(ref, prompt, n), f"prompt {i} ({len(prompt)} tokens)"
        ref_lp = torch.log_softmax(hf_logits(ref, torch.tensor(prompt + comp.token_ids)), dim=-1)
        assert comp.logprobs is not None and len(comp.logprobs) == n
        for j, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert entry[token].logprob == pytest.approx(float(ref_lp[len(prompt) - 1 + j, token]), abs=LOGPROB_ATOL)
        if prompt_logprobs:
            assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
            for j in range(1, len(prompt)):
                got = out.prompt_logprobs[j][prompt[j]].logprob
                assert got == pytest.approx(float(ref_lp[j - 1, prompt[j]]), abs=LOGPROB_ATOL), (i, j)


def assert_all_pages_free(llm: LLM) -> None:
    core = llm.engine.core
    assert not llm.engine.has_unfinished_requests()
    core.scheduler.check_invariants()
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages


def greedy(n: int = MAX_TOKENS, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0, **kw)


@pytest.mark.parametrize("name", ENGINE_MODELS)
def test_engine_greedy_matches_transformers(tiny, name: str) -> None:
    """A mixed batch (5 to 90 tokens: inside and several times past the window) in one LLM, prompt
    and output log-probabilities included."""
    ref, folder = tiny(name)
    llm = tiny_llm(folder)
    prompts = prompts_for()
    outs = llm.generate(prompts, greedy(prompt_logprobs=0), use_tqdm=False)
    check_against_transformers(ref, prompts, outs, MAX_TOKENS, prompt_logprobs=True)
    # one at a time gives the same as the batch
    alone = llm.generate(prompts[1], greedy(), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert_all_pages_free(llm)


@pytest.mark.parametrize("name", WINDOWED)
def test_chunked_prefill_matches_one_chunk(tiny, name: str) -> None:
    """Chunks of 7 tokens: smaller than every window here and dividing none, so chunk boundaries fall
    everywhere relative to the window and the pages."""
    ref, folder = tiny(name)
    window = max(w for w in EXPECTED_WINDOWS[name] if w is not None)
    chunk = 7
    assert chunk < window and window % chunk
    prompts = prompts_for()
    whole = tiny_llm(folder).generate(prompts, greedy(), use_tqdm=False)
    llm = tiny_llm(folder, max_num_batched_tokens=chunk)
    chunked = llm.generate(prompts, greedy(prompt_logprobs=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in chunked] == [o.outputs[0].token_ids for o in whole]
    check_against_transformers(ref, prompts, chunked, MAX_TOKENS, prompt_logprobs=True)
    assert_all_pages_free(llm)


@pytest.mark.parametrize("name", ["gemma3", "qwen2-window"])
def test_preemption_under_a_tiny_pool(tiny, name: str) -> None:
    """Four requests needing 18 pages of their full-attention layers in a pool of 8: preempted ones are
    recomputed (window layers included) and still give transformers' tokens; every page comes back."""
    ref, folder = tiny(name)
    prompts = prompts_for((37, 50, 45, 61), seed=40)
    llm = tiny_llm(folder, num_kv_pages=8, max_num_batched_tokens=32, max_num_seqs=4)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    check_against_transformers(ref, prompts, outs, MAX_TOKENS)
    assert_all_pages_free(llm)


# --- KV memory --------------------------------------------------------------------------------------


def _dense_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * 4  # K and V, float32


def _pages(n: int) -> int:
    return -(-n // PAGE)


CHUNK = 32


def _kv_bytes(tiny, name: str) -> tuple[Any, Any]:
    """(the transformers config, `kv_bytes_per_sequence` of an engine on the model, chunks of CHUNK)."""
    ref, folder = tiny(name)
    llm = tiny_llm(folder, max_num_batched_tokens=CHUNK, max_num_seqs=4)
    return ref.config, llm.engine.core.kv_bytes_per_sequence


def test_kv_bytes_grow_with_the_global_layers_only(tiny) -> None:
    cfg, kv = _kv_bytes(tiny, "gemma3")
    num_global = cfg.layer_types.count("full_attention")
    assert num_global == 2
    per_token_global = _dense_bytes_per_token(num_global, cfg.num_key_value_heads, cfg.head_dim)
    for n1, n2 in ((100, 250), (64, 65), (97, 200)):
        assert kv(n2) - kv(n1) == (_pages(n2) - _pages(n1)) * PAGE * per_token_global, (n1, n2)
    # what the window layers hold is a constant, far less than all their tokens
    window_part = kv(250) - _pages(250) * PAGE * per_token_global
    per_token_local = _dense_bytes_per_token(cfg.num_hidden_layers - num_global, cfg.num_key_value_heads,
                                             cfg.head_dim)
    assert 0 < window_part <= (_pages(GEMMA_W + CHUNK) + 2) * PAGE * per_token_local
    assert kv(250) < _pages(250) * PAGE * _dense_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                                 cfg.head_dim)


def test_kv_bytes_constant_when_every_layer_slides(tiny) -> None:
    cfg, kv = _kv_bytes(tiny, "mistral-w24")
    sizes = {kv(n) for n in (64, 100, 250)}
    assert len(sizes) == 1, sizes
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = _dense_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
    assert 0 < sizes.pop() <= (_pages(24 + CHUNK) + 2) * PAGE * per_token
