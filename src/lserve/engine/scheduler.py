"""Continuous batching with chunked prefill under a per-step token budget.

One rule (vLLM's): every request's `num_computed_tokens` catches up with its `num_tokens`. A step
hands out at most `max_num_batched_tokens` new tokens: first one token to each running request
that is decoding, then chunks to running requests that are still prefilling (or recomputing after
a preemption), then chunks to waiting requests in arrival order, while there are free seats
(`max_num_seqs`) and free pages. When a running request needs a page and the pool is empty, the
newest running request is preempted: its pages are freed and it is recomputed later. The oldest
request is never preempted by a newer one, so it always progresses, and a request that fits the
pool alone (checked on admission by the engine) always finishes.

At most one request is part-way through its prefill between steps (two or more of its known
tokens still to compute) or is a computed prefix whose sequences have not all forked: a waiting
request is admitted only with budget left after every running one got all it asked for, one that
would be cut short waits while another request is part-way (the admission loop checks it), and a
prefix's sequences are queued right behind it, so nothing behind them is admitted before the last
one forked. The ring and window pools are sized on this (`RingGeometry.pool_pages`: one prefill
window, the other requests' decode windows).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lserve.kv_cache.manager import ForkCopy, KVCacheManager, extend_page_keys
from lserve.runner.structured import consume
from lserve.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """This step computes the request's last known token, so it yields a new one."""
        req = self.request
        return not req.prefill_only and req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    """Decodes first (one token each), then prefill chunks."""
    num_decodes: int
    preempted: list[str] = field(default_factory=list)
    forks: list[ForkCopy] = field(default_factory=list)
    """Device copies to make before the step runs: sequences that start from a shared prefix."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefixes: dict[str, Request] = {}
        """Prefill-only requests that have computed their tokens and hold their pages (and a seat)
        until the sequences forking from them have forked."""
        self._unforked: dict[str, int] = {}
        """Per prefill-only request: the sequences that have not forked from it yet."""
        self.prefix_cache_queries = 0
        """Tokens admitted requests looked up in the prefix cache (vLLM's prefix_cache_queries)."""
        self.prefix_cache_hits = 0
        """Of those, tokens whose KV the cache held."""
        self.ended: list[str] = []
        """Requests ended (finished, aborted, or a shared prefix released) since the engine last
        took them (`take_ended`): their state outside the scheduler goes too."""

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_group(self, prefix: Request, children: list[Request]) -> None:
        """A prefill-only prefix and the sequences that fork from it once it has run (queued in
        this order, so the prefix is admitted first)."""
        assert prefix.prefill_only and all(c.fork_of == prefix.request_id for c in children)
        self._unforked[prefix.request_id] = len(children)
        for req in (prefix, *children):
            self.add_request(req)

    def _release_prefix(self, child: Request) -> None:
        """`child` no longer waits to fork (it forked, fell back to its own prefill, or ended):
        the prefix is freed once no sequence waits for it."""
        prefix_id, child.fork_of = child.fork_of, None
        if prefix_id is None or prefix_id not in self._unforked:
            return
        self._unforked[prefix_id] -= 1
        if self._unforked[prefix_id] > 0:
            return
        del self._unforked[prefix_id]
        done = self.prefixes.pop(prefix_id, None)
        if done is not None:
            self.kv.free(prefix_id)
            done.status = RequestStatus.FINISHED_STOPPED
            self.ended.append(prefix_id)
            return
        prefix = self.find(prefix_id)  # still prefilling: nobody needs it any more
        if prefix is not None:
            self.finish(prefix, RequestStatus.FINISHED_ABORTED)

    def _fork(self, req: Request) -> tuple[bool, ForkCopy | None]:
        """Before admitting `req`: (whether it may be admitted now, the copies of its fork, which
        gives it the prefix's computed tokens). A sequence whose prefix has not finished waits;
        one that cannot get a seat or a page to fork computes its prompt itself instead (so a
        full pool never stalls it)."""
        prefix = self.prefixes.get(req.fork_of or "")
        if prefix is None:
            if req.fork_of in self._unforked:
                return False, None  # the prefix is still being computed
            self._release_prefix(req)
            return True, None
        fork = self.kv.fork(prefix.request_id, req.request_id, prefix.num_tokens)
        if fork is None:
            self._release_prefix(req)
            return True, None
        req.num_computed_tokens = prefix.num_tokens
        return True, fork

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
                n = min(req.num_pending_tokens, budget)
                if not self._allocate_or_preempt(req, n, decodes, prefills, preempted):
                    continue
                (decodes if want_decode else prefills).append(ScheduledRequest(req, n))
                budget -= n
            budget = self.max_num_batched_tokens - sum(s.num_new_tokens for s in decodes + prefills)
        forks: list[ForkCopy] = []
        given = {s.request.request_id: s.num_new_tokens for s in decodes + prefills}
        part_way = any(req.num_pending_tokens - given.get(req.request_id, 0) >= 2 for req in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            if part_way and self.waiting[0].num_pending_tokens - budget >= 2:
                break  # it would be a second request part-way through its prefill
            admitted = self._admit(self.waiting[0], budget, forks)
            if admitted is None:
                break
            prefills.append(admitted)
            budget -= admitted.num_new_tokens
        return SchedulerOutput(decodes + prefills, len(decodes), preempted, forks)

    def _admit(self, req: Request, budget: int, forks: list[ForkCopy]) -> ScheduledRequest | None:
        """Admit the queue's head with up to `budget` tokens: its fork from a shared prefix or
        its cached prefix first, then pages for its first chunk; None (and no change) when it
        must wait."""
        fork = None
        cached = 0
        looked_up = False
        if req.fork_of is not None:
            ready, fork = self._fork(req)
            if not ready:
                return None
        elif self.kv.enable_caching and req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None:
            # (prompt log-probabilities need every prompt position's logits: such a request computes them)
            looked_up = True
            # at most the pages before the last known token's (which is computed, to sample from)
            num_pages = (req.num_tokens - req.num_inflight_tokens - 1) // self.kv.page_size
            extend_page_keys(req.page_keys, req.token_ids, num_pages, self.kv.page_size)
            cached = req.num_computed_tokens = self.kv.cached_prefix(req.request_id, req.page_keys[:num_pages])
        n = min(req.num_pending_tokens, budget)
        if not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
            if fork is not None or cached:  # it waits on, without the shared pages
                self.kv.free(req.request_id)
                req.num_computed_tokens = 0
            return None
        if looked_up:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += cached
            if req.first_scheduled_time is None:
                req.num_cached_tokens = cached
        if fork is not None:
            forks.append(fork)
            self._release_prefix(req)
        self.waiting.popleft()
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.running.append(req)
        return ScheduledRequest(req, n)

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
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            if samples:
                req.num_inflight_tokens += 1
            if self.kv.enable_caching:  # its full pages whose tokens are computed and known
                num_pages = min(req.num_computed_tokens, req.num_tokens - req.num_inflight_tokens) // self.kv.page_size
                extend_page_keys(req.page_keys, req.token_ids, num_pages, self.kv.page_size)
                self.kv.register(req.request_id, req.page_keys, num_pages)
            if req.prefill_only and req.num_pending_tokens == 0 and req in self.running:
                # a shared prefix is computed (on the device, in order before any later step):
                # its pages wait for the sequences that fork from it
                self.running.remove(req)
                self.prefixes[req.request_id] = req

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
        if req.fork_of is not None:
            self._release_prefix(req)
        if req.request_id in self.prefixes:
            return  # a computed prefix ends when its last sequence has forked
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.num_inflight_tokens = 0  # a token still in flight is dropped when it arrives
        req.status = status
        req.error = error
        self.ended.append(req.request_id)

    def take_ended(self) -> list[str]:
        ended, self.ended = self.ended, []
        return ended

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
        assert set(self.kv.page_tables) <= {r.request_id for r in self.running} | set(self.prefixes), \
            "pages held by a request that neither runs nor is a computed prefix"
        assert set(self.prefixes) <= set(self._unforked), "a computed prefix nobody waits for"
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
            assert 0 <= req.num_computed_tokens <= req.num_tokens
            have = len(self.kv.page_tables.get(req.request_id, ()))
            assert have >= self.kv.pages_for(req.num_computed_tokens), "computed tokens without pages"
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and req.request_id not in self.kv.page_tables
