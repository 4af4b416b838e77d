"""Continuous batching with chunked prefill under a per-step token budget.

One rule (vLLM's): every request's `num_computed_tokens` catches up with its `num_tokens`. A step
hands out at most `max_num_batched_tokens` new tokens: first one token to each running request
that is decoding, then chunks to running requests that are still prefilling (or recomputing after
a preemption), then chunks to waiting requests in arrival order, while there are free seats
(`max_num_seqs`) and free pages. When a running request needs a page and the pool is empty, the
newest running request is preempted: its pages are freed and it is recomputed later. The oldest
request is never preempted by a newer one, so it always progresses, and a request that fits the
pool alone (checked on admission by the engine) always finishes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lserve.kv_cache.manager import KVCacheManager
from lserve.runner.structured import consume
from lserve.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This step computes the request's last known token, so it yields a new one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    """Decodes first (one token each), then prefill chunks."""
    num_decodes: int
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_chunk_tokens: int | None = None
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_chunk_tokens = max_chunk_tokens or max_num_batched_tokens
        """The longest prefill chunk one request gets in a step (a ring pool holds its window plus
        one chunk, so a sliding-window model keeps chunks short)."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    # ---- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        preempted: list[str] = []
        for want_decode in (True, False):
            for req in list(self.running):
                if req not in self.running or (req.num_pending_tokens == 1) != want_decode or budget == 0:
                    continue
                if not req.needs_more_tokens:  # its last token is in flight: it finishes when that arrives
                    continue
                n = min(req.num_pending_tokens, budget, self.max_chunk_tokens)
                if not self._allocate_or_preempt(req, n, decodes, prefills, preempted):
                    continue
                (decodes if want_decode else prefills).append(ScheduledRequest(req, n))
                budget -= n
            budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in decodes + prefills)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            n = min(req.num_pending_tokens, budget, self.max_chunk_tokens)
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            prefills.append(ScheduledRequest(req, n))
            budget -= n
        return SchedulerOutput(decodes + prefills, len(decodes), preempted)

    def _allocate_or_preempt(
        self,
        req: Request,
        n: int,
        decodes: list[ScheduledRequest],
        prefills: list[ScheduledRequest],
        preempted: list[str],
    ) -> bool:
        """Make room for `n` more tokens of `req`, preempting the newest running requests if needed."""
        while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
            victim = self.running[-1]
            for lst in (decodes, prefills):
                lst[:] = [s for s in lst if s.request is not victim]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ---- after the model ran ---------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish requests; returns requests with news."""
        self.advance(output)
        return self.resolve(output, sampled)

    def advance(self, output: SchedulerOutput) -> None:
        """The step was launched: its tokens count as computed, and each request it samples has one
        more token in flight (async scheduling schedules the next step before `resolve`)."""
        for s in output.scheduled:
            samples = s.samples
            s.request.num_computed_tokens += s.num_new_tokens
            if samples:
                s.request.num_inflight_tokens += 1

    def resolve(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """The step's sampled tokens arrived: append them, finish requests that stop; returns the
        requests with news. A request finished (or aborted) meanwhile drops its token."""
        changed: list[Request] = []
        for s in output.scheduled:
            req = s.request
            token = sampled.get(req.request_id)
            if token is None or req.is_finished or req.num_inflight_tokens == 0:
                continue
            req.num_inflight_tokens -= 1
            req.append_token(token)
            changed.append(req)
            stop = req.check_stop()
            if req.structured is not None and consume(req.structured, token) and stop is None:
                stop = RequestStatus.FINISHED_STOPPED  # the grammar is complete
            if stop is not None:
                self.finish(req, stop)
        return changed

    def finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        """End a request wherever it is and free its pages at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.num_inflight_tokens = 0  # a token still in flight is dropped when it arrives
        req.status = status
        req.error = error

    def find(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                return req
        return None

    def check_invariants(self) -> None:
        """Consistency of queues, page tables and counters (tests call this after every step)."""
        self.kv.check_invariants()
        assert len(self.running) <= self.max_num_seqs
        ids = [r.request_id for r in (*self.running, *self.waiting)]
        assert len(ids) == len(set(ids)), "a request is queued twice"
        assert set(self.kv.page_tables) <= {r.request_id for r in self.running}, "pages held by a non-running request"
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            assert 0 <= req.num_computed_tokens <= req.num_tokens
            have = len(self.kv.page_tables.get(req.request_id, ()))
            assert have >= self.kv.pages_for(req.num_computed_tokens), "computed tokens without pages"
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and req.request_id not in self.kv.page_tables
