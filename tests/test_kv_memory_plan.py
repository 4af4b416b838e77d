"""The KV memory plan: the constant blocks per request (streaming heads' ring, sliding-window
layers' window pool) never shorten the longest request that an all-paged cache of the same
memory admits, however many requests `max_num_seqs` asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.errors import RequestRejected
from lserve.sparse.patterns import HeadPattern, save_pattern
from tests.helpers_models import hf_config, hf_model, save_hf, save_word_tokenizer

MEMORY = dict(kv_cache_memory_bytes=3_000_000, max_num_seqs=64, max_num_batched_tokens=64, page_size=16,
              dtype="float32", device="cpu")
WINDOWS = dict(prefill_sink_tokens=16, prefill_local_tokens=64, decode_sink_tokens=16, decode_local_tokens=64)


def _folder(tmp: Path, family: str) -> Path:
    cfg = hf_config(family, num_key_value_heads=4, num_attention_heads=8, head_dim=16, max_position_embeddings=1 << 20)
    folder = save_hf(hf_model(cfg, seed=1), tmp / family)
    save_word_tokenizer(folder)
    return folder


def _longest(llm: LLM) -> int:
    """The longest prompt + output the engine admits (checked: that length passes, one page more does not)."""
    core = llm.engine.core
    page = core.kv_cache.shape.page_size
    longest = core.kv_manager.num_pages * page

    def admits(n: int) -> bool:
        try:
            core.make_request("probe", [1] * (n - 1), SamplingParams(max_tokens=1), frozenset())
        except RequestRejected:
            return False
        return True

    assert admits(longest) and not admits(longest + page)
    return longest


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_streaming_heads_never_shorten_the_longest_request(tmp_path: Path, fraction: float) -> None:
    folder = _folder(tmp_path, "llama")
    pattern = save_pattern(HeadPattern(torch.rand((2, 4), generator=torch.Generator().manual_seed(1)),
                                       {"method": "random, for tests"}), tmp_path / "pattern.json")
    dense = _longest(LLM(model=str(folder), **MEMORY))
    streaming = LLM(model=str(folder), streaming_sparsity=fraction, attn_pattern=str(pattern), **WINDOWS, **MEMORY)
    assert streaming.engine.core.kv_cache.ring is not None
    assert _longest(streaming) >= dense
    assert 1 <= streaming.engine.core.num_seats < 64  # the blocks for 64 requests would not have fit


def test_the_window_pool_never_shortens_the_longest_request(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "gemma3")
    paged = _longest(LLM(model=str(folder), window_pool=False, **MEMORY))
    pooled = LLM(model=str(folder), window_pool=True, **MEMORY)
    assert pooled.engine.core.kv_cache.window is not None
    assert _longest(pooled) >= paged


def test_streaming_heads_almost_double_the_longest_request_when_the_windows_fit(tmp_path: Path) -> None:
    """With the memory for 64 requests' sinks and windows (and one step's chunks), half of the
    heads streaming leaves the paged pool nearly twice the tokens: ring pages are taken as the
    windows need them, not reserved for a prefill chunk per request."""
    folder = _folder(tmp_path, "llama")
    pattern = save_pattern(HeadPattern(torch.rand((2, 4), generator=torch.Generator().manual_seed(1)),
                                       {"method": "random, for tests"}), tmp_path / "pattern.json")
    memory = {**MEMORY, "kv_cache_memory_bytes": 80_000_000}
    dense = _longest(LLM(model=str(folder), **memory))
    streaming = LLM(model=str(folder), streaming_sparsity=0.5, attn_pattern=str(pattern), **WINDOWS, **memory)
    assert streaming.engine.core.num_seats == 64
    assert _longest(streaming) >= 1.8 * dense
