"""Turns the scheduler's output into the runner's `StepData`, keeping track of what the runner knows.

The scheduler works on live `Request` objects; the runner must not (it may live in another
process). For each request the builder remembers how many known tokens and page ids it has sent,
so a step carries only what changed: a new (or resumed) request in full, a running one as the
tokens and pages added since. A request that ends is named once in the next step's
`finished_ids`; one that is preempted in that step's `preempted_ids`, and sent in full when it
runs again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lserve.kv_cache.manager import ForkCopy, KVCacheManager
from lserve.request import Request
from lserve.runner.step import NewRequestData, ScheduledChunk, StepData
from lserve.runner.structured import grammar_bitmask


@dataclass
class _Sent:
    tokens: int
    pages: int


class StepBuilder:
    def __init__(self, kv: KVCacheManager, vocab_size: int) -> None:
        self.kv = kv
        self.vocab_size = vocab_size
        self._sent: dict[str, _Sent] = {}
        self._ended: list[str] = []
        self._preempted: list[str] = []

    def forget(self, request_id: str) -> None:
        """The request ended: the runner drops its state with the next step."""
        self._sent.pop(request_id, None)
        self._ended.append(request_id)

    def preempted(self, request_id: str) -> None:
        """The request lost its pages: the runner drops its tokens and page table with the next step."""
        if self._sent.pop(request_id, None) is not None:
            self._preempted.append(request_id)

    def flush(self) -> StepData | None:
        """A step with nothing to compute that names the requests ended since the last one
        (None: none ended)."""
        if not self._ended:
            return None
        ended, self._ended = self._ended, []
        return StepData([], 0, finished_ids=ended)

    def build(self, scheduled: list[tuple[Request, int, bool]], num_decodes: int, forks: list[ForkCopy]) -> StepData:
        """`scheduled`: (request, tokens to compute, whether it samples), decodes first."""
        tables, seats = self.kv.page_tables, self.kv.seats
        new: list[NewRequestData] = []
        chunks: list[ScheduledChunk] = []
        for req, n, samples in scheduled:
            rid = req.request_id
            pages = tables[rid]
            known = req.num_tokens - req.num_inflight_tokens
            sent = self._sent.get(rid)
            if sent is None:
                new.append(NewRequestData(rid, req.token_ids(0, known), req.num_prompt_tokens, req.sampling_params,
                                          req.eos_token_ids, seats[rid], list(pages), len(req.prompt_logprobs),
                                          req.prefill_only))
                self._sent[rid] = _Sent(known, len(pages))
                chunks.append(ScheduledChunk(rid, req.num_computed_tokens, n, samples))
                continue
            chunks.append(ScheduledChunk(rid, req.num_computed_tokens, n, samples,
                                         sent.tokens, req.token_ids(sent.tokens, known) if known > sent.tokens else [],
                                         sent.pages, list(pages[sent.pages:])))
            sent.tokens, sent.pages = max(sent.tokens, known), len(pages)
        ended, self._ended = self._ended, []
        preempted, self._preempted = self._preempted, []
        return StepData(chunks, num_decodes, new, ended, preempted, list(forks), self._bitmask(scheduled))

    def _bitmask(self, scheduled: list[tuple[Request, int, bool]]) -> np.ndarray | None:
        """The grammar masks of the sampling rows (their matchers are up to date: the engine reads
        a constrained request's token before scheduling its next step)."""
        matchers = [req.structured for req, _, samples in scheduled if samples]
        return grammar_bitmask(matchers, self.vocab_size)
