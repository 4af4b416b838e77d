"""Scheduler: continuous batching, chunked prefill, decodes first, seats, preemption, finish/abort.

No model: a fake runner returns one deterministic token per request that samples this step.
`run_step` calls `scheduler.check_invariants()` after `schedule()` and after `update()` of every
step, and checks the step's shape (token budget, decodes first, pages cover the scheduled tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest

from lserve.engine.scheduler import Scheduler, SchedulerOutput
from lserve.kv_cache.manager import KVCacheManager, cdiv
from lserve.request import Request, RequestStatus
from lserve.sampling_params import SamplingParams

EOS = 2

# ---- helpers ----------------------------------------------------------------------------------


def make_scheduler(num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> Scheduler:
    sched = Scheduler(KVCacheManager(num_pages, page_size), max_num_seqs, max_num_batched_tokens)
    sched.check_invariants()
    return sched


def make_requests(
    prompt_lens: Iterable[int],
    max_tokens: int | Iterable[int] = 4,
    *,
    prefix: str = "r",
    eos_token_ids: frozenset[int] = frozenset({EOS}),
    params: SamplingParams | None = None,
) -> list[Request]:
    """Requests named f"{prefix}{i}" with prompts of the given lengths (token ids that are never EOS)."""
    prompt_lens = list(prompt_lens)
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompt_lens)
    out = []
    for i, (n, mt) in enumerate(zip(prompt_lens, max_tokens, strict=True)):
        prompt = [10 + (7 * i + j) % 50 for j in range(n)]
        out.append(Request(f"{prefix}{i}", prompt, params or SamplingParams(max_tokens=mt), mt, eos_token_ids))
    return out


class FakeRunner:
    """Returns a token for each scheduled request that samples this step.

    By default the token is 1000 + the number of tokens already generated (never EOS or a stop
    id); `script[request_id]` overrides it with a list of tokens (cycled).
    """

    def __init__(self, script: dict[str, list[int]] | None = None) -> None:
        self.script = script or {}
        self.calls = 0

    def __call__(self, out: SchedulerOutput) -> dict[str, int]:
        self.calls += 1
        sampled = {}
        for s in out.scheduled:
            if not s.samples:
                continue
            req = s.request
            k = len(req.output_token_ids)
            tokens = self.script.get(req.request_id)
            sampled[req.request_id] = tokens[k % len(tokens)] if tokens else 1000 + k
        return sampled


class Harness:
    """A scheduler, a fake runner, arrival order, and a log of every step."""

    def __init__(self, sched: Scheduler, runner: FakeRunner | None = None) -> None:
        self.sched = sched
        self.runner = runner or FakeRunner()
        self.order: dict[str, int] = {}
        self.all: dict[str, Request] = {}
        self.log: list[dict] = []

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.order[r.request_id] = len(self.order)
            self.all[r.request_id] = r
            self.sched.add_request(r)
            self.sched.check_invariants()

    def step(self) -> SchedulerOutput:
        out, samples = run_step(self.sched, self.runner, self.order)
        self.log.append(
            {
                "scheduled": [(s.request.request_id, s.num_new_tokens) for s in out.scheduled],
                "samples": samples,
                "num_decodes": out.num_decodes,
                "preempted": list(out.preempted),
            }
        )
        return out

    @property
    def last_samples(self) -> list[bool]:
        """`samples` of each scheduled request of the last step, read before `update()`."""
        return [self.log[-1]["samples"][rid] for rid, _ in self.log[-1]["scheduled"]]

    def drive(self, max_steps: int = 10_000, before_step: Callable[[Harness], None] | None = None) -> int:
        """Step until nothing is unfinished; returns the number of steps."""
        for n in range(max_steps):
            if before_step is not None:
                before_step(self)
            if self.sched.num_unfinished == 0:
                return n
            out = self.step()
            assert not out.is_empty, "unfinished requests but nothing scheduled"
        raise AssertionError(f"not done after {max_steps} steps")

    def assert_all_pages_free(self) -> None:
        kv = self.sched.kv
        assert kv.num_free_pages == kv.num_pages
        assert kv.page_tables == {}
        assert kv.usage == 0.0
        assert not self.sched.running and not self.sched.waiting


def run_step(
    sched: Scheduler, runner: FakeRunner, order: dict[str, int] | None = None
) -> tuple[SchedulerOutput, dict[str, bool]]:
    """schedule -> checks -> fake model -> update -> checks; returns the output and who sampled.

    (`ScheduledRequest.samples` reads the request's live counters, so it is only meaningful
    between `schedule()` and `update()`.)
    """
    out = sched.schedule()
    sched.check_invariants()
    kv = sched.kv

    # Token budget.
    assert out.num_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert all(s.num_new_tokens >= 1 for s in out.scheduled)
    # Every scheduled request is running, once, with pages for what it computes this step.
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), "a request is scheduled twice"
    for s in out.scheduled:
        req = s.request
        assert req in sched.running and req.status is RequestStatus.RUNNING
        assert req.num_computed_tokens + s.num_new_tokens <= req.num_tokens
        assert len(kv.page_tables[req.request_id]) >= kv.pages_for(req.num_computed_tokens + s.num_new_tokens)
    # Decodes first, one token each.
    assert 0 <= out.num_decodes <= len(out.scheduled)
    for s in out.scheduled[: out.num_decodes]:
        assert s.num_new_tokens == 1 and s.request.num_pending_tokens == 1 and s.samples
    for s in out.scheduled[out.num_decodes :]:
        assert s.request.num_pending_tokens > 1 or s.request.num_computed_tokens == 0
    # Preempted requests: recompute from scratch, no pages, waiting, not scheduled.
    for rid in out.preempted:
        assert rid not in ids
        assert rid not in kv.page_tables
        victim = sched.find(rid)
        assert victim is not None and victim in sched.waiting
        assert victim.status is RequestStatus.WAITING and victim.num_computed_tokens == 0
    if out.preempted:
        assert [r.request_id for r in list(sched.waiting)[: len(out.preempted)]] == out.preempted[::-1], (
            "preempted requests go to the front of the waiting queue, oldest first"
        )
    if order is not None:
        running = [order[r.request_id] for r in sched.running]
        assert running == sorted(running), "running requests are kept in arrival order"
        if out.preempted:
            # Only the newest are preempted: everyone still running arrived before every victim.
            assert max(running, default=-1) < min(order[rid] for rid in out.preempted)

    samples = {s.request.request_id: s.samples for s in out.scheduled}
    sampled = runner(out)
    assert set(sampled) == {rid for rid, yes in samples.items() if yes}
    before = {s.request.request_id: (s.request.num_computed_tokens, len(s.request.output_token_ids)) for s in out.scheduled}
    changed = sched.update(out, sampled)
    sched.check_invariants()

    assert {r.request_id for r in changed} == set(sampled)
    for s in out.scheduled:
        req = s.request
        computed, n_out = before[req.request_id]
        assert req.num_computed_tokens == computed + s.num_new_tokens
        assert len(req.output_token_ids) == n_out + (1 if samples[req.request_id] else 0)
        assert len(req.output_token_ids) <= req.max_tokens
        if req.is_finished:
            assert req not in sched.running and req.request_id not in kv.page_tables
        else:
            assert req.num_pending_tokens >= 1
    return out, samples


# ---- token budget and chunked prefill ----------------------------------------------------------


def test_long_prompt_is_chunked_and_samples_once():
    h = Harness(make_scheduler(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=16))
    (r,) = make_requests([50], max_tokens=3)
    h.add(r)
    chunks = []
    samples = []
    while h.sched.num_unfinished:
        out = h.sched.schedule()
        h.sched.check_invariants()
        assert len(out.scheduled) == 1
        s = out.scheduled[0]
        chunks.append(s.num_new_tokens)
        samples.append(s.samples)
        h.sched.update(out, h.runner(out))
        h.sched.check_invariants()
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert samples == [False, False, False, True, True, True]
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == [1000, 1001, 1002]
    assert r.num_computed_tokens == 52  # the last sampled token is never computed
    h.assert_all_pages_free()


def test_budget_never_exceeded_with_many_requests():
    h = Harness(make_scheduler(num_pages=200, page_size=4, max_num_seqs=8, max_num_batched_tokens=20))
    h.add(*make_requests([7, 33, 1, 19, 50, 3, 12, 28], max_tokens=[5, 2, 9, 1, 4, 6, 3, 7]))
    h.drive()
    totals = [sum(n for _, n in e["scheduled"]) for e in h.log]
    assert max(totals) <= 20
    assert max(totals) == 20, "the budget is used fully when there is work"
    # Each request's scheduled tokens add up to prompt + outputs - 1 (no preemption here).
    got: dict[str, int] = {}
    for e in h.log:
        for rid, n in e["scheduled"]:
            got[rid] = got.get(rid, 0) + n
    for rid, req in h.all.items():
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert len(req.output_token_ids) == req.max_tokens
        assert got[rid] == req.num_prompt_tokens + req.max_tokens - 1
    h.assert_all_pages_free()


def test_new_request_takes_only_leftover_budget():
    h = Harness(make_scheduler(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=10))
    a, b = make_requests([6, 30], max_tokens=20)
    h.add(a, b)
    out = h.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 6), ("r1", 4)]
    assert h.last_samples == [True, False]
    out = h.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 9)]
    assert out.num_decodes == 1


def test_budget_of_one_token():
    h = Harness(make_scheduler(num_pages=16, page_size=2, max_num_seqs=2, max_num_batched_tokens=1))
    h.add(*make_requests([3, 2], max_tokens=2))
    h.drive()
    assert all(len(e["scheduled"]) == 1 and e["scheduled"][0][1] == 1 for e in h.log)
    assert all(len(r.output_token_ids) == 2 for r in h.all.values())
    h.assert_all_pages_free()


# ---- decodes first -----------------------------------------------------------------------------


def test_decodes_are_scheduled_first_every_step():
    h = Harness(make_scheduler(num_pages=128, page_size=4, max_num_seqs=4, max_num_batched_tokens=10))
    a, b = make_requests([3, 4], max_tokens=30, prefix="d")
    h.add(a, b)
    h.step()  # both prefilled in one step, both sampled
    assert a.num_pending_tokens == b.num_pending_tokens == 1
    (long,) = make_requests([100], max_tokens=2, prefix="long")
    h.add(long)
    steps = 0
    while not long.output_token_ids:
        computed = long.num_computed_tokens
        out = h.step()
        steps += 1
        assert out.num_decodes == 2
        assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled[:2]] == [("d0", 1), ("d1", 1)]
        assert len(out.scheduled) == 3
        chunk = out.scheduled[2]
        assert chunk.request is long
        assert chunk.num_new_tokens == min(8, 100 - computed)
        assert out.num_tokens == 2 + chunk.num_new_tokens
    assert steps == cdiv(100, 8)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 1 + steps
    # Now all three decode together.
    out = h.step()
    assert out.num_decodes == 3 and [s.num_new_tokens for s in out.scheduled] == [1, 1, 1]
    h.drive()
    h.assert_all_pages_free()


def test_admission_waits_for_budget_then_joins_as_decode():
    h = Harness(make_scheduler(num_pages=128, page_size=4, max_num_seqs=4, max_num_batched_tokens=12))
    old, new = make_requests([14, 2], max_tokens=5)
    h.add(old, new)
    h.step()  # old: 12 tokens, new not admitted (no budget)
    assert new in h.sched.waiting
    out = h.step()  # old finishes its prompt (2), new admitted (2)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 2), ("r1", 2)]
    out = h.step()
    assert out.num_decodes == 2


def test_decodes_can_use_the_whole_budget():
    h = Harness(make_scheduler(num_pages=128, page_size=4, max_num_seqs=4, max_num_batched_tokens=3))
    h.add(*make_requests([1, 1, 1], max_tokens=4))
    h.step()
    (late,) = make_requests([5], prefix="late")
    h.add(late)
    for _ in range(3):
        out = h.step()
        assert out.num_decodes == 3 and out.num_tokens == 3
        assert late in h.sched.waiting
    h.drive()
    h.assert_all_pages_free()


# ---- max_num_seqs ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_max_num_seqs(max_num_seqs):
    h = Harness(make_scheduler(num_pages=256, page_size=4, max_num_seqs=max_num_seqs, max_num_batched_tokens=64))
    h.add(*make_requests([5, 6, 7, 8, 9], max_tokens=[3, 5, 2, 4, 1]))
    seen_running = 0
    while h.sched.num_unfinished:
        out = h.step()
        assert len(out.scheduled) <= max_num_seqs
        assert len(h.sched.running) <= max_num_seqs
        seen_running = max(seen_running, len(out.scheduled))
    assert seen_running == max_num_seqs
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in h.all.values())
    h.assert_all_pages_free()


def test_seat_frees_when_a_request_finishes():
    h = Harness(make_scheduler(num_pages=64, page_size=4, max_num_seqs=1, max_num_batched_tokens=64))
    a, b = make_requests([4, 4], max_tokens=2)
    h.add(a, b)
    h.step()
    assert h.sched.running == [a] and list(h.sched.waiting) == [b]
    h.step()
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert h.sched.running == [] and list(h.sched.waiting) == [b]
    out = h.step()
    assert [s.request for s in out.scheduled] == [b]


# ---- preemption --------------------------------------------------------------------------------


def test_preemption_of_newest_and_recovery():
    # 4 pages of 4 tokens; each request needs 6 + 8 = 14 tokens = 4 pages alone.
    h = Harness(make_scheduler(num_pages=4, page_size=4, max_num_seqs=4, max_num_batched_tokens=32))
    a, b = make_requests([6, 6], max_tokens=8)
    h.add(a, b)
    out = h.step()
    assert {s.request.request_id for s in out.scheduled} == {"r0", "r1"}
    assert h.sched.kv.num_free_pages == 0
    first_preemption = None
    while h.sched.num_unfinished:
        pages_before = len(h.sched.kv.page_tables.get("r1", ()))
        out = h.step()
        assert "r0" not in out.preempted, "the oldest is never preempted by a newer request"
        if out.preempted and first_preemption is None:
            first_preemption = out
            assert out.preempted == ["r1"]
            assert pages_before > 0
            assert b.num_computed_tokens == 0 and b.status is RequestStatus.WAITING
            assert "r1" not in h.sched.kv.page_tables
            assert h.sched.waiting[0] is b and b not in h.sched.running
            assert b.num_preemptions == 1
            assert [s.request.request_id for s in out.scheduled] == ["r0"]
    assert first_preemption is not None
    assert h.sched.num_preemptions >= 1 and a.num_preemptions == 0
    for r in (a, b):
        assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8
    # The recomputed request kept its output tokens and continued them.
    assert b.output_token_ids == [1000 + k for k in range(8)]
    h.assert_all_pages_free()


def test_recompute_includes_generated_tokens():
    h = Harness(make_scheduler(num_pages=4, page_size=4, max_num_seqs=4, max_num_batched_tokens=32))
    a, b = make_requests([6, 6], max_tokens=8)
    h.add(a, b)
    while not h.log or not h.log[-1]["preempted"]:
        h.step()
    n_out = len(b.output_token_ids)
    assert n_out >= 1 and b.num_computed_tokens == 0
    # Once readmitted, b recomputes prompt + outputs, then samples its next token.
    mark = len(h.log)
    samples = []
    while len(b.output_token_ids) == n_out:
        h.step()
        samples += [h.log[-1]["samples"][rid] for rid, _ in h.log[-1]["scheduled"] if rid == "r1"]
    recomputed = sum(n for e in h.log[mark:] for rid, n in e["scheduled"] if rid == "r1")
    assert recomputed == 6 + n_out
    assert samples[-1] and not any(samples[:-1])
    h.drive()
    assert b.output_token_ids == [1000 + k for k in range(8)]
    h.assert_all_pages_free()


def test_preemption_order_with_three_requests():
    # page_size 2, 6 pages: three 4-token prompts fill the pool; each needs (4 + 8) / 2 = 6 pages alone.
    h = Harness(make_scheduler(num_pages=6, page_size=2, max_num_seqs=3, max_num_batched_tokens=12))
    reqs = make_requests([4, 4, 4], max_tokens=8)
    h.add(*reqs)
    out = h.step()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1", "r2"]
    assert h.sched.kv.num_free_pages == 0
    h.drive()
    events = [rid for e in h.log for rid in e["preempted"]]
    assert events[:2] == ["r2", "r1"], events
    assert "r0" not in events
    assert reqs[0].num_preemptions == 0 and reqs[2].num_preemptions >= 1 and reqs[1].num_preemptions >= 1
    assert all(r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8 for r in reqs)
    h.assert_all_pages_free()


def test_several_preemptions_in_one_step():
    # Four 4-token prompts fill 8 pages of 2; next step every decode needs a third page.
    h = Harness(make_scheduler(num_pages=8, page_size=2, max_num_seqs=4, max_num_batched_tokens=16))
    reqs = make_requests([4, 4, 4, 4], max_tokens=6)
    h.add(*reqs)
    h.step()
    assert h.sched.kv.num_free_pages == 0
    out = h.step()
    # r0 pushes out r3 and takes one of its pages, r1 takes the other, r2 (now newest) yields itself.
    assert out.preempted == ["r3", "r2"]
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"] and out.num_decodes == 2
    assert [r.request_id for r in h.sched.waiting] == ["r2", "r3"]
    h.drive()
    assert all(r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 6 for r in reqs)
    assert reqs[0].num_preemptions == 0
    h.assert_all_pages_free()


def test_request_that_fills_the_pool_alone_finishes_among_others():
    h = Harness(make_scheduler(num_pages=5, page_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    reqs = make_requests([12, 3, 9, 1], max_tokens=[8, 17, 11, 19])  # each needs exactly 5 pages
    assert all(h.sched.kv.pages_for(r.num_prompt_tokens + r.max_tokens) == 5 for r in reqs)
    h.add(*reqs)
    h.drive()
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert reqs[0].num_preemptions == 0
    h.assert_all_pages_free()


# ---- finish / abort ----------------------------------------------------------------------------


def test_abort_waiting_request():
    h = Harness(make_scheduler(num_pages=16, page_size=4, max_num_seqs=1, max_num_batched_tokens=16))
    a, b = make_requests([4, 4], max_tokens=4)
    h.add(a, b)
    h.step()
    assert b in h.sched.waiting
    free = h.sched.kv.num_free_pages
    h.sched.finish(b, RequestStatus.FINISHED_ABORTED)
    h.sched.check_invariants()
    assert b.status is RequestStatus.FINISHED_ABORTED and b.is_finished
    assert b not in h.sched.waiting and h.sched.find("r1") is None
    assert h.sched.kv.num_free_pages == free
    h.drive()
    assert a.status is RequestStatus.FINISHED_LENGTH and b.output_token_ids == []
    h.assert_all_pages_free()


def test_abort_running_request_frees_pages_immediately():
    h = Harness(make_scheduler(num_pages=16, page_size=4, max_num_seqs=4, max_num_batched_tokens=16))
    a, b = make_requests([5, 9], max_tokens=10)
    h.add(a, b)
    h.step()
    h.step()
    held = len(h.sched.kv.page_tables["r1"])
    assert held == 3
    free = h.sched.kv.num_free_pages
    h.sched.finish(b, RequestStatus.FINISHED_ABORTED)
    h.sched.check_invariants()
    assert h.sched.kv.num_free_pages == free + held
    assert "r1" not in h.sched.kv.page_tables and b not in h.sched.running
    assert b.status is RequestStatus.FINISHED_ABORTED
    h.drive()
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert len(b.output_token_ids) == 2
    h.assert_all_pages_free()


def test_abort_mid_prefill():
    h = Harness(make_scheduler(num_pages=32, page_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    long, short = make_requests([40, 3], max_tokens=3)
    h.add(long, short)
    h.step()
    h.step()
    assert long.num_computed_tokens == 16 and not long.output_token_ids
    assert len(h.sched.kv.page_tables["r0"]) == 4
    h.sched.finish(long, RequestStatus.FINISHED_ABORTED)
    h.sched.check_invariants()
    assert "r0" not in h.sched.kv.page_tables
    assert long.status is RequestStatus.FINISHED_ABORTED
    out = h.step()
    assert [s.request for s in out.scheduled] == [short]
    h.drive()
    assert short.status is RequestStatus.FINISHED_LENGTH
    assert long.output_token_ids == []
    h.assert_all_pages_free()


def test_abort_preempted_request():
    h = Harness(make_scheduler(num_pages=4, page_size=4, max_num_seqs=4, max_num_batched_tokens=32))
    a, b = make_requests([6, 6], max_tokens=8)
    h.add(a, b)
    while not h.log or not h.log[-1]["preempted"]:
        h.step()
    assert b in h.sched.waiting
    h.sched.finish(b, RequestStatus.FINISHED_ABORTED)
    h.sched.check_invariants()
    assert b.status is RequestStatus.FINISHED_ABORTED and h.sched.find("r1") is None
    h.drive()
    assert a.status is RequestStatus.FINISHED_LENGTH
    h.assert_all_pages_free()


def test_finish_with_error():
    h = Harness(make_scheduler(num_pages=8, page_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    (a,) = make_requests([5])
    h.add(a)
    h.step()
    h.sched.finish(a, RequestStatus.FINISHED_ERROR, "boom")
    h.sched.check_invariants()
    assert a.status is RequestStatus.FINISHED_ERROR and a.error == "boom"
    h.assert_all_pages_free()


def test_find():
    h = Harness(make_scheduler(num_pages=8, page_size=4, max_num_seqs=1, max_num_batched_tokens=8))
    a, b = make_requests([2, 2])
    h.add(a, b)
    h.step()
    assert h.sched.find("r0") is a and h.sched.find("r1") is b and h.sched.find("nope") is None


# ---- stop conditions ---------------------------------------------------------------------------


def test_stop_on_eos():
    h = Harness(make_scheduler(16, 4, 4, 16), FakeRunner({"r0": [5, 6, EOS, 7]}))
    (r,) = make_requests([3], max_tokens=10)
    h.add(r)
    h.drive()
    assert r.status is RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [5, 6, EOS], "EOS is included in the output tokens"
    h.assert_all_pages_free()


def test_ignore_eos():
    h = Harness(make_scheduler(16, 4, 4, 16), FakeRunner({"r0": [5, EOS]}))
    (r,) = make_requests([3], max_tokens=6, params=SamplingParams(max_tokens=6, ignore_eos=True))
    h.add(r)
    h.drive()
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == [5, EOS, 5, EOS, 5, EOS]
    h.assert_all_pages_free()


def test_stop_token_ids():
    h = Harness(make_scheduler(16, 4, 4, 16), FakeRunner({"r0": [5, 6, 7, 8], "r1": [5, 6, 7, 8]}))
    r0, r1 = make_requests(
        [3, 3], max_tokens=10, params=SamplingParams(max_tokens=10, stop_token_ids=[7], ignore_eos=True)
    )
    h.add(r0, r1)
    h.drive()
    for r in (r0, r1):
        assert r.status is RequestStatus.FINISHED_STOPPED
        assert r.output_token_ids == [5, 6, 7]
    h.assert_all_pages_free()


def test_max_tokens():
    h = Harness(make_scheduler(32, 4, 4, 16))
    reqs = make_requests([3, 8, 1], max_tokens=[1, 4, 7])
    h.add(*reqs)
    h.drive()
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert len(r.output_token_ids) == r.max_tokens
    h.assert_all_pages_free()


def test_check_stop_precedence():
    def req(tokens, **kw):
        r = Request("x", [1], SamplingParams(**kw), max_tokens=len(tokens), eos_token_ids=frozenset({EOS}))
        for t in tokens:
            r.append_token(t)
        return r

    assert req([EOS]).check_stop() is RequestStatus.FINISHED_STOPPED  # eos beats length
    assert req([5]).check_stop() is RequestStatus.FINISHED_LENGTH
    assert req([EOS], ignore_eos=True).check_stop() is RequestStatus.FINISHED_LENGTH
    assert req([9], stop_token_ids=[9], ignore_eos=True).check_stop() is RequestStatus.FINISHED_STOPPED
    r = Request("y", [1], SamplingParams(), max_tokens=5, eos_token_ids=frozenset({EOS}))
    r.append_token(4)
    assert r.check_stop() is None
    assert r.num_tokens == 2 and r.all_token_ids == [1, 4] and r.num_prompt_tokens == 1


# ---- randomized scenarios ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_random_scenarios(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8, 16])
    n_req = rng.randint(1, 10)
    prompt_lens = [rng.randint(1, 60) for _ in range(n_req)]
    max_tokens = [rng.randint(1, 20) for _ in range(n_req)]
    need_alone = max(cdiv(p + m, page_size) for p, m in zip(prompt_lens, max_tokens))
    num_pages = need_alone + rng.choice([0, 0, 0, 1, 2, 5, 20])
    max_num_seqs = rng.randint(1, 6)
    budget = rng.choice([1, 2, 3, 8, 16, 32, 64, 128])
    abort_p = rng.choice([0.0, 0.02, 0.1])
    eos_p = rng.choice([0.0, 0.05])

    script = {}
    for i in range(n_req):
        script[f"r{i}"] = [EOS if rng.random() < eos_p else rng.randint(3, 999) for _ in range(25)]
    h = Harness(make_scheduler(num_pages, page_size, max_num_seqs, budget), FakeRunner(script))
    reqs = make_requests(prompt_lens, max_tokens)
    # Arrivals spread over the first steps; a few arrive at once.
    arrivals = sorted(rng.randint(0, 15) for _ in reqs)
    pending = list(zip(arrivals, reqs))
    aborted: set[str] = set()
    step_no = 0

    def before_step(hh: Harness) -> None:
        nonlocal step_no
        while pending and pending[0][0] <= step_no:
            hh.add(pending.pop(0)[1])
        if abort_p and rng.random() < abort_p:
            live = [r for r in (*hh.sched.running, *hh.sched.waiting)]
            if live:
                victim = rng.choice(live)
                hh.sched.finish(victim, RequestStatus.FINISHED_ABORTED)
                hh.sched.check_invariants()
                aborted.add(victim.request_id)
        step_no += 1

    for _ in range(20_000):
        before_step(h)
        if not pending and h.sched.num_unfinished == 0:
            break
        if h.sched.num_unfinished:
            out = h.step()
            assert not out.is_empty
    else:
        raise AssertionError("scenario did not finish")

    for r in reqs:
        assert r.is_finished, r
        assert len(r.output_token_ids) <= r.max_tokens
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            continue
        assert r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert len(r.output_token_ids) == r.max_tokens
            assert EOS not in r.output_token_ids
        else:
            assert r.output_token_ids[-1] == EOS and EOS not in r.output_token_ids[:-1]
        # The outputs follow the script regardless of chunking and preemption.
        k = len(r.output_token_ids)
        assert r.output_token_ids == script[r.request_id][:k]
    # The oldest live request is never preempted by a newer one.
    for e in h.log:
        if e["preempted"]:
            still = [rid for rid, _ in e["scheduled"]]
            assert all(h.order[s] < h.order[p] for s in still for p in e["preempted"])
    h.assert_all_pages_free()


def test_at_most_one_request_is_part_way_through_its_prefill_between_steps():
    """The ring and window pools are sized for one prefill window (`RingGeometry.pool_pages`):
    between steps at most one running request has two or more known tokens left to compute,
    under a small budget, many prompts, preemptions and requests arriving mid-run."""
    rng = random.Random(3)
    for trial in range(6):
        h = Harness(make_scheduler(num_pages=60 + 20 * trial, page_size=4, max_num_seqs=6, max_num_batched_tokens=9))
        lengths = [rng.randint(1, 40) for _ in range(12)]
        requests = make_requests(lengths, max_tokens=[rng.randint(1, 8) for _ in lengths])
        h.add(*requests[:6])
        late = requests[6:]

        def check(h: Harness) -> None:
            part_way = [r.request_id for r in h.sched.running if r.num_pending_tokens >= 2]
            assert len(part_way) <= 1, part_way
            if late and rng.random() < 0.3:
                h.add(late.pop())

        h.drive(before_step=check)
        while late:
            h.add(late.pop())
            h.drive(before_step=check)
        h.assert_all_pages_free()
