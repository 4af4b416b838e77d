"""Sliding-window layers through the Triton backend (TRITON_INTERPRET=1 on a CPU, compiled on a
GPU) against the torch backend: the window pool's ring in prefill chunks that cross the window and
wrap the ring, and in decode."""

from __future__ import annotations

import pytest
import torch

from lserve import LLM, SamplingParams
from tests.helpers_models import hf_config, hf_model, random_ids, save_hf, save_word_tokenizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("window", [8, 40])
def test_window_layers_triton_equals_torch(tmp_path, window: int) -> None:
    # Qwen2 with layer 0 full and layers 1-2 sliding: both pools in one model
    ref = hf_model(hf_config("qwen2", use_sliding_window=True, sliding_window=window, max_window_layers=1,
                             num_hidden_layers=3), seed=11)
    folder = save_hf(ref, tmp_path / "model")
    save_word_tokenizer(folder)
    prompts = [{"prompt_token_ids": random_ids(n, seed=n).tolist()} for n in (83, 9, 150)]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        # chunks of 24 tokens, two requests at once: the window pool's pages are returned behind the
        # windows and taken again several times per prompt
        llm = LLM(model=str(folder), dtype="float32", device=DEVICE, attention_backend=backend, page_size=16,
                  max_num_batched_tokens=24, max_num_seqs=2, enforce_eager=True)
        core = llm.engine.core
        pool = core.runner.ring_pages["window"]
        assert core.kv_cache.window is not None and pool.num_pages * 16 < 83 + 150  # less than the prompts hold
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
        assert pool.num_free_pages == pool.num_pages
    assert outs["triton"] == outs["torch"]


def test_window_layers_in_the_paged_pool_give_the_same_tokens(tmp_path) -> None:
    """window_pool=False (the baseline for comparisons): the windowed layers are paged, their KV
    grows with the context, and the tokens are the same as with the window pool."""
    ref = hf_model(hf_config("mistral", sliding_window=20), seed=12)
    folder = save_hf(ref, tmp_path / "model")
    save_word_tokenizer(folder)
    prompts = [random_ids(n, seed=n).tolist() for n in (70, 33)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs, cores = [], []
    for window_pool in (True, False):
        llm = LLM(model=str(folder), dtype="float32", device="cpu", page_size=16, max_num_batched_tokens=32,
                  window_pool=window_pool)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        cores.append(llm.engine.core)
    assert outs[0] == outs[1]
    pooled, paged = cores
    assert pooled.kv_bytes_per_sequence(4000) == pooled.kv_bytes_per_sequence(100)
    assert paged.kv_cache.window is None and paged.kv_bytes_per_sequence(4000) > paged.kv_bytes_per_sequence(100)
