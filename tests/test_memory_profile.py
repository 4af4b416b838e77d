"""Start-up memory profiling (`engine.memory_profile`): the KV budget under `gpu_memory_utilization`.

The GPU's memory counters are faked here (the CPU has none); everything else is real: the
provisional runtime with streaming heads and page selection is built, runs its profiling step
of `max_num_batched_tokens` prompt tokens and its wide sampling, and is dropped before the real
cache is sized from what was "measured".
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lserve.engine.core as core_module
import lserve.engine.memory_profile as mp
from lserve import LLM, SamplingParams
from lserve.config import EngineConfig
from lserve.errors import LServeError
from lserve.sparse.patterns import HeadPattern, save_pattern
from tests.helpers_models import hf_config, hf_model, save_hf, save_word_tokenizer

GiB = 2**30
SETTINGS = dict(max_num_seqs=8, max_num_batched_tokens=100, page_size=16, dtype="float32", device="cpu",
                streaming_sparsity=0.5, prefill_sink_tokens=16, prefill_local_tokens=32, decode_sink_tokens=16,
                decode_local_tokens=32, token_budget=64, selection_local_tokens=16)
PROMPTS = [list(range(5, 200)), list(range(7, 60))]


def test_the_budget_is_the_share_less_what_was_measured() -> None:
    p = mp.MemoryProfile(total=80 * GiB, utilization=0.9, in_use=16 * GiB, activations=2 * GiB, graphs=GiB // 2)
    assert p.kv_budget == int(72 * GiB) - 16 * GiB - 2 * GiB - GiB // 2
    assert p.check() == p.kv_budget
    assert "0.90 of 80.0 GiB" in p.describe() and "KV cache 53.50 GiB" in p.describe()
    spent = mp.MemoryProfile(total=80 * GiB, utilization=0.3, in_use=16 * GiB, activations=8 * GiB, graphs=0)
    with pytest.raises(LServeError, match="no GPU memory left for the KV cache.*gpu_memory_utilization"):
        spent.check()


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, True, "0.9"])
def test_gpu_memory_utilization_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig.from_kwargs(gpu_memory_utilization=bad)


@pytest.mark.parametrize(("step", "chunk", "requests", "pages"), [(8192, 2048, 4, 4 * 128 + 1), (100, 64, 2, 9),
                                                                   (64, 64, 1, 5)])
def test_the_provisional_cache_holds_one_largest_step(step: int, chunk: int, requests: int, pages: int) -> None:
    config = EngineConfig.from_kwargs(page_size=16, max_num_seqs=256, kv_cache_memory_bytes=123)
    provisional = mp.provisional_cache_config(config, step, chunk)
    assert provisional.scheduler.max_num_seqs == requests
    assert provisional.cache.num_kv_pages == pages and provisional.cache.kv_cache_memory_bytes is None
    data = mp.profiling_step(step, chunk, 16, 1000, seed=0)
    assert data.num_tokens == step and len(data.new_requests) == requests
    assert all(c.num_tokens <= chunk and c.start == 0 and c.samples for c in data.scheduled)
    used = [p for new in data.new_requests for p in new.page_ids]
    assert len(used) == len(set(used)) and max(used) < pages


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("profile")
    cfg = hf_config("llama", num_key_value_heads=4, num_attention_heads=8, head_dim=16)
    path = save_hf(hf_model(cfg, seed=3), tmp / "llama")
    save_word_tokenizer(path)
    pattern = save_pattern(HeadPattern(torch.rand((2, 4), generator=torch.Generator().manual_seed(2)),
                                       {"method": "random, for tests"}), tmp / "pattern.json")
    return path, pattern


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, total: int, in_use: int, peak: int) -> list[int]:
    """The engine profiles on the CPU with fake counters: each measured piece of work runs for
    real and reports `peak` bytes. Returns the list of the steps' token counts it saw."""
    seen: list[int] = []
    monkeypatch.setattr(core_module.EngineCore, "_profiles_memory", lambda self: True)
    monkeypatch.setattr(core_module, "memory_in_use", lambda device: (in_use, total))
    monkeypatch.setattr(core_module, "release", lambda device: None)

    def peak_during(device: torch.device, work) -> int:
        work()
        return peak

    monkeypatch.setattr(mp, "_peak_during", peak_during)
    launch = core_module.ModelRunner.launch

    def spy(self, step):
        seen.append(step.num_tokens)
        return launch(self, step)

    monkeypatch.setattr(core_module.ModelRunner, "launch", spy)
    return seen


def test_the_engine_sizes_its_cache_from_the_profile(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    path, pattern = folder
    greedy = SamplingParams(temperature=0, max_tokens=8)
    reference = LLM(model=str(path), attn_pattern=str(pattern), kv_cache_memory_bytes=2_000_000, **SETTINGS)
    want = [o.outputs[0].token_ids for o in reference.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy,
                                                               use_tqdm=False)]
    seen = _fake_gpu(monkeypatch, total=10_000_000, in_use=5_000_000, peak=500_000)
    llm = LLM(model=str(path), attn_pattern=str(pattern), gpu_memory_utilization=0.8, **SETTINGS)
    assert seen == [100]  # one profiling step of max_num_batched_tokens prompt tokens
    # 0.8 x 10 MB - 5 MB in use - 0.5 MB step - 0.5 MB sampling (no graphs on the CPU): the same plan as 2 MB
    core = llm.engine.core
    assert core.kv_manager.num_pages == reference.engine.core.kv_manager.num_pages
    assert core.num_seats == reference.engine.core.num_seats
    # the provisional runtime leaves nothing behind: the same tokens as an engine that never profiled
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy,
                                                        use_tqdm=False)]
    assert got == want


def test_an_engine_without_room_for_its_cache_says_so(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    path, pattern = folder
    _fake_gpu(monkeypatch, total=10_000_000, in_use=8_500_000, peak=500_000)
    with pytest.raises(LServeError, match="no GPU memory left for the KV cache"):
        LLM(model=str(path), attn_pattern=str(pattern), gpu_memory_utilization=0.9, **SETTINGS)


@pytest.mark.parametrize(("device", "tp", "explicit", "profiles"), [
    ("cuda", 1, {}, True), ("cpu", 1, {}, False), ("cuda", 2, {}, False),
    ("cuda", 1, {"kv_cache_memory_bytes": 10**9}, False), ("cuda", 1, {"kv_cache_memory_fraction": 0.5}, False),
    ("cuda", 1, {"num_kv_pages": 100}, False)])
def test_only_one_gpu_without_an_explicit_size_profiles(device: str, tp: int, explicit: dict, profiles: bool) -> None:
    core = SimpleNamespace(device=torch.device(device), tp=SimpleNamespace(size=tp),
                           config=EngineConfig.from_kwargs(**explicit))
    assert core_module.EngineCore._profiles_memory(core) is profiles
