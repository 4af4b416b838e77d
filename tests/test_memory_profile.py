"""Start-up memory profiling (`engine.memory_profile`): the KV budget under `gpu_memory_utilization`.

The GPU's memory counters are faked here (the CPU has none); everything else is real: the
provisional runtime with streaming heads and page selection is built, runs its profiling step
of `max_num_batched_tokens` prompt tokens and its wide sampling, and is dropped before the real
cache is sized from what was "measured".
"""

from __future__ import annotations

import dataclasses
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
    p = mp.MemoryProfile(total=80 * GiB, utilization=0.9, in_use=16 * GiB, free=64 * GiB, activations=2 * GiB,
                         graphs=GiB // 2)
    assert p.kv_budget == int(72 * GiB) - 16 * GiB - 2 * GiB - GiB // 2
    assert p.check() == p.kv_budget
    assert "0.90 of 80.0 GiB" in p.describe() and "KV cache 53.50 GiB" in p.describe()
    assert "other processes" not in p.describe()
    spent = mp.MemoryProfile(total=80 * GiB, utilization=0.3, in_use=16 * GiB, free=64 * GiB, activations=8 * GiB,
                             graphs=0)
    with pytest.raises(LServeError, match="no GPU memory left for the KV cache.*gpu_memory_utilization"):
        spent.check()


def test_other_processes_memory_is_theirs() -> None:
    """The share is this engine's: another process's memory does not count against it (two engines
    at 0.45 share a GPU), but the cache never takes more than is free."""
    alone = mp.MemoryProfile(total=80 * GiB, utilization=0.45, in_use=4 * GiB, free=72 * GiB, activations=GiB,
                             graphs=0)
    beside = dataclasses.replace(alone, free=36 * GiB - 4 * GiB)  # another engine holds 40 GiB
    assert alone.kv_budget == beside.kv_budget == int(36 * GiB) - 5 * GiB
    crowded = dataclasses.replace(alone, free=20 * GiB)
    assert crowded.kv_budget == 19 * GiB and "limited to the 20.00 GiB free" in crowded.describe()


def test_context_copies_are_bounded_by_the_context_and_by_the_cache() -> None:
    base = dict(total=80 * GiB, utilization=0.9, in_use=8 * GiB, free=70 * GiB, activations=GiB, graphs=0)
    short = mp.MemoryProfile(**base, context_bytes_per_token=4096, kv_bytes_per_token=65536, max_context=131072)
    assert short.context_copies == 131072 * 4096 and short.kv_budget == int(72 * GiB) - 9 * GiB - 512 * 2**20
    # a window longer than the cache could hold: the copies of as many tokens as the cache keeps
    long = dataclasses.replace(short, max_context=1 << 30)
    room = long.before_context
    assert long.context_copies == room * 4096 // (65536 + 4096)
    assert long.kv_budget // 65536 * 4096 <= long.context_copies
    assert mp.MemoryProfile(**base).context_copies == 0


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


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, total: int, at_start: int, in_use: int, peak: int) -> list[int]:
    """The engine profiles on the CPU with fake counters: the GPU holds `at_start` bytes before the
    engine and `at_start + in_use` once it has loaded; each measured piece of work runs for real
    and reports `peak` bytes. Returns the list of the steps' token counts it saw."""
    seen: list[int] = []
    readings = iter([at_start, at_start + in_use])
    monkeypatch.setattr(core_module.EngineCore, "_profiles_memory", lambda self: True)
    monkeypatch.setattr(core_module, "gpu_memory", lambda device: (next(readings), total))
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
    seen = _fake_gpu(monkeypatch, total=10_000_000, at_start=1_000_000, in_use=5_000_000, peak=500_000)
    profiles: list[mp.MemoryProfile] = []
    check = mp.MemoryProfile.check
    monkeypatch.setattr(mp.MemoryProfile, "check", lambda self: profiles.append(self) or check(self))
    llm = LLM(model=str(path), attn_pattern=str(pattern), gpu_memory_utilization=0.8, **SETTINGS)
    assert seen == [100]  # one profiling step of max_num_batched_tokens prompt tokens
    (profile,) = profiles
    # 0.8 x 10 MB - 5 MB loaded - 0.5 MB step - 0.5 MB head (no graphs on the CPU; the 1 MB held before
    # the engine is not its own, and 4 MB are free) = 2 MB for the cache and the context copies: the torch
    # backend gathers K and V (float32) of the paged pool's heads per token of a row's context
    core = llm.engine.core
    assert profile.in_use == 5_000_000 and profile.free == 4_000_000 and profile.before_context == 2_000_000
    assert profile.context_bytes_per_token == 2 * max(core.kv_cache.shape.heads_per_layer) * 16 * 4
    assert profile.context_copies == min(core.max_model_len * profile.context_bytes_per_token,
                                         2_000_000 * profile.context_bytes_per_token
                                         // (profile.kv_bytes_per_token + profile.context_bytes_per_token))
    monkeypatch.undo()
    reference = LLM(model=str(path), attn_pattern=str(pattern), kv_cache_memory_bytes=profile.kv_budget, **SETTINGS)
    assert core.kv_manager.num_pages == reference.engine.core.kv_manager.num_pages
    assert core.num_seats == reference.engine.core.num_seats
    # the provisional runtime leaves nothing behind: the same tokens as an engine that never profiled
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, greedy, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == want


def test_an_engine_without_room_for_its_cache_says_so(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    path, pattern = folder
    _fake_gpu(monkeypatch, total=10_000_000, at_start=500_000, in_use=8_500_000, peak=500_000)
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
