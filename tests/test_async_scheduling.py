"""Async scheduling (the default): a step is launched before the previous step's tokens are read.

It must change nothing a caller can see: the same tokens, texts and finish reasons as the
synchronous engine for greedy and seeded sampling, stop tokens, stop strings, max_tokens,
repetition penalties, aborts and preemption; and no request computes past `max_tokens`.
"""

from __future__ import annotations

import pytest

from lserve import LLM, SamplingParams
from lserve.request import INFLIGHT_TOKEN

PROMPTS = [
    "Write a short poem about the sea.",
    "List three prime numbers:",
    "The capital of France is",
    "Explain what a KV cache is in one sentence.",
]


@pytest.fixture(scope="module")
def sync_llm() -> LLM:
    return LLM(dtype="float32", device="cpu", async_scheduling=False)


def _run(llm: LLM, params: list[SamplingParams]) -> list[tuple[list[int], str, str | None]]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_same_outputs_as_the_synchronous_engine(default_llm, sync_llm) -> None:
    assert default_llm.engine.core.async_scheduling and not sync_llm.engine.core.async_scheduling
    params = [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=14),
        SamplingParams(temperature=0, max_tokens=30, stop=[" is", "."]),
        SamplingParams(temperature=0.7, top_k=20, seed=5, max_tokens=6, repetition_penalty=1.3),
    ]
    got, want = _run(default_llm, params), _run(sync_llm, params)
    assert got == want
    assert [len(t) for t, _, _ in got][0] == 9 and got[0][2] == "length"
    core = default_llm.engine.core
    assert not core.has_unfinished_requests() and not core.kv_manager.page_tables
    assert all(not r.num_inflight_tokens for r in core.scheduler.running)


def test_stop_token_ends_the_request_and_its_extra_token_is_dropped(default_llm, sync_llm) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=40)
    first = default_llm.generate(PROMPTS[2], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = first[3]  # stop on the 4th generated token: the step after it is already launched
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id])
    got = default_llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    want = sync_llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids == first[: first.index(stop_id) + 1]
    assert got.finish_reason == "stop"
    assert INFLIGHT_TOKEN not in got.token_ids
    # the request's own page counts leave out the step launched after its stop token
    got_out = default_llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    want_out = sync_llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    keys = ("decode_pages_read", "decode_pages_dense", "decode_pages_read_fraction")
    assert [got_out.metrics[k] for k in keys] == [want_out.metrics[k] for k in keys]
    assert got_out.metrics["decode_pages_read_fraction"] == 1.0  # dense attention


def test_the_engine_counts_only_returned_tokens(default_llm) -> None:
    core = default_llm.engine.core
    before = core.num_generation_tokens
    outs = default_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                                use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 7 for o in outs)
    assert core.num_generation_tokens - before == 7 * len(PROMPTS)


def test_abort_while_a_step_is_in_flight(default_llm) -> None:
    engine = default_llm.engine
    keep = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    gone = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()  # the third call has a step in flight that includes `gone`
    final = engine.abort_request(gone)
    assert final is not None and final.outputs[0].finish_reason == "abort"
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert set(outputs) == {keep} and len(outputs[keep].outputs[0].token_ids) == 12
    core = engine.core
    while core.has_unfinished_requests():  # the last launched step, whose tokens nobody needs
        core.step()
    assert not core.kv_manager.page_tables and not core.kv_manager.seats


def test_preemption_gives_the_synchronous_tokens() -> None:
    """A pool too small for the batch: requests are preempted while their next token is in flight."""
    settings = dict(dtype="float32", device="cpu", page_size=16, num_kv_pages=12, max_num_batched_tokens=64)
    prompts = [p * 3 for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    async_llm, sync = LLM(**settings), LLM(**settings, async_scheduling=False)
    got = [o.outputs[0].token_ids for o in async_llm.generate(prompts, greedy, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in sync.generate(prompts, greedy, use_tqdm=False)]
    assert async_llm.engine.core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == want
    core = async_llm.engine.core
    core.scheduler.check_invariants()
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_an_interrupted_read_loses_no_token(default_llm, sync_llm, monkeypatch, mode: str) -> None:
    """Reading a step's tokens can be interrupted (Ctrl-C while waiting for the device): the step
    stays pending and the next calls read it; nothing is lost or duplicated (with async
    scheduling and without)."""
    from lserve.runner.model_runner import LaunchedStep

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = sync_llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    engine = (default_llm if mode == "async" else sync_llm).engine
    rid = engine.add_request(PROMPTS[1], params)
    engine.step()
    engine.step()
    real = LaunchedStep.tokens
    calls = []

    def interrupted_once(self: LaunchedStep) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        return real(self)

    monkeypatch.setattr(LaunchedStep, "tokens", interrupted_once)
    with pytest.raises(RuntimeError, match="interrupted"):
        engine.step()
    final = None
    for _ in range(40):  # bounded: a lost token would keep the request running forever
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id == rid
            final = out
    assert final is not None and final.finished and final.outputs[0].token_ids == want
    assert not engine.core.has_unfinished_requests()
    assert all(not r.num_inflight_tokens for r in engine.core.scheduler.running)


@pytest.mark.parametrize("async_scheduling,top_p", [(False, None), (True, None), (False, 0.5), (True, 0.5)])
def test_request_page_counts_add_up_under_preemption_and_abort(async_scheduling: bool, top_p: float | None) -> None:
    """Per-request decode page counts (RequestOutput.metrics) against the engine's totals, with
    page selection on, a pool small enough to preempt and one request aborted midway. The
    synchronous engine keeps every decode row it runs, so the requests' counts sum to the
    totals exactly; launched ahead, rows whose token is dropped (after a stop, an abort or a
    preemption) count only in the totals, the device having read their pages. With a top-p
    budget the stored pages are counted on the device and added once each step has run."""
    llm = LLM(dtype="float32", device="cpu", page_size=16, num_kv_pages=12, max_num_batched_tokens=64,
              token_budget=48, selector_interval=2, async_scheduling=async_scheduling, selection_top_p=top_p,
              selection_min_tokens=16)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p * 3, greedy) for p in PROMPTS]
    finals = {}
    for step in range(200):  # bounded: a lost token fails instead of hanging
        if not engine.has_unfinished_requests():
            break
        if step == 30:
            aborted = engine.abort_request(ids[1])
            assert aborted is not None and aborted.finished
            finals[ids[1]] = aborted
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished_requests() and set(finals) == set(ids)
    core = engine.core
    assert core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    stats = engine.get_stats()
    read = sum(o.metrics.get("decode_pages_read", 0) for o in finals.values())
    dense = sum(o.metrics.get("decode_pages_dense", 0) for o in finals.values())
    assert 0 < read < dense  # selection read fewer pages than dense attention would
    if async_scheduling:
        assert read <= stats.decode_pages_read and dense <= stats.decode_pages_dense
    else:
        assert (read, dense) == (stats.decode_pages_read, stats.decode_pages_dense)
    assert all(len(finals[i].outputs[0].token_ids) == 40 for i in ids if i != ids[1])
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
