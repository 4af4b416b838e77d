"""The calibrated pattern shipped for the default model: found without attn_pattern, and packaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from lserve import LLM, SamplingParams
from lserve.model.loader import DEFAULT_MODEL_NAME
from lserve.sparse.patterns import SHIPPED_DIR, load_pattern, shipped_pattern
from tests.passkey import FILLER

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_default_model_pattern_is_shipped_with_its_settings() -> None:
    path = shipped_pattern(DEFAULT_MODEL_NAME)
    assert path is not None, f"no {DEFAULT_MODEL_NAME}.json in {SHIPPED_DIR}"
    pattern = load_pattern(path)
    assert pattern.shape == (30, 3)
    meta = pattern.metadata
    assert meta["model"] == DEFAULT_MODEL_NAME and (meta["sink"], meta["local"]) == (64, 512)
    assert meta["steps"] >= 1 and meta["wall_time_s"] > 0 and meta["device"] in ("cpu", "cuda")
    assert float(pattern.scores.min()) < 0.9 < float(pattern.scores.max())  # calibrated: the gates spread
    assert path.parent == SHIPPED_DIR
    assert '"patterns/*.json"' in (ROOT / "pyproject.toml").read_text()  # package data: ships in the wheel


def test_streaming_sparsity_alone_uses_the_shipped_pattern() -> None:
    """LLM(streaming_sparsity=0.5) needs no attn_pattern for the default model, and it behaves
    exactly like passing the shipped file explicitly."""
    path = shipped_pattern(DEFAULT_MODEL_NAME)
    assert path is not None
    window = {"prefill_sink_tokens": 16, "prefill_local_tokens": 64, "decode_sink_tokens": 16,
              "decode_local_tokens": 64}
    prompt = "Here is a story. " + FILLER * 10 + "\nThe story is about"  # ~220 tokens, past sink + local
    greedy = SamplingParams(temperature=0, max_tokens=4)
    found = LLM(dtype="float32", device="cpu", num_kv_pages=32, streaming_sparsity=0.5, **window)
    given = LLM(dtype="float32", device="cpu", num_kv_pages=32, streaming_sparsity=0.5, attn_pattern=str(path), **window)
    a = found.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    b = given.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(a) == 4 and a == b
