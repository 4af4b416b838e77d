"""Streaming heads through the engine on the default model (torch backend, CPU).

The head pattern here is random: these tests check the mechanics (the Λ mask in prefill and
decode, chunked prefill across the sink/local boundary), not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.sparse.patterns import HeadPattern, save_pattern
from tests.passkey import FILLER

pytestmark = pytest.mark.slow

SINK, LOCAL = 16, 128
LONG = "Here is a story. " + FILLER * 30 + "\nThe story is about"  # ~630 tokens, far past sink + local
SHORT = "The capital of France is"  # prompt + output stay inside the local window


@pytest.fixture(scope="module")
def pattern_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("pattern") / "random.json"
    return save_pattern(HeadPattern(torch.rand((30, 3), generator=gen), {"method": "random, for tests"}), path)


def _streaming_llm(pattern_path: Path, **kw) -> LLM:
    return LLM(dtype="float32", device="cpu", streaming_sparsity=0.5, attn_pattern=str(pattern_path),
               prefill_sink_tokens=SINK, prefill_local_tokens=LOCAL, decode_sink_tokens=SINK,
               decode_local_tokens=LOCAL, **kw)


def test_streaming_heads_change_long_contexts_only(default_llm, pattern_path: Path) -> None:
    llm = _streaming_llm(pattern_path)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    dense = default_llm.generate([SHORT, LONG], greedy, use_tqdm=False)
    sparse = llm.generate([SHORT, LONG], greedy, use_tqdm=False)
    # inside the window every key is visible, so streaming heads are exact
    assert sparse[0].outputs[0].token_ids == dense[0].outputs[0].token_ids
    assert sparse[1].outputs[0].token_ids != dense[1].outputs[0].token_ids
    core = llm.engine.core
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages


def test_chunked_prefill_across_the_window_matches_one_chunk(pattern_path: Path) -> None:
    """Chunks of 48 tokens cross the sink and local boundaries: same tokens as one chunk."""
    greedy = SamplingParams(temperature=0, max_tokens=12)
    whole = _streaming_llm(pattern_path).generate(LONG, greedy, use_tqdm=False)[0]
    chunked = _streaming_llm(pattern_path, max_num_batched_tokens=48).generate(LONG, greedy, use_tqdm=False)[0]
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
