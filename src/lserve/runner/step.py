"""The step boundary: what the engine tells the model runner each step, as plain data.

A `StepData` is the only thing that passes from the engine's scheduler to the runner. It holds no
live object of the engine (no `Request`, no queue, no page manager): lists, ints, strings,
sampling settings and an optional NumPy bitmask, so it can be pickled and sent to a runner in
another process (the tensor-parallel workers). The runner keeps what persists between steps in
its own per-request state (`RequestState`): token ids, page table row, sampling settings.

Deltas are idempotent: a chunk names where its new token ids and page ids start, so applying the
same step twice (a benchmark that relaunches one decode step) changes nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lserve.kv_cache.manager import ForkCopy
from lserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner does not know (first scheduled, or resumed after a preemption): its
    whole state, replacing anything the runner kept under the same id."""

    request_id: str
    token_ids: list[int]
    """Every known token: the prompt, then the output generated so far (a resumed request)."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    seat: int
    page_ids: list[int]
    num_prompt_logprobs: int = 0
    """Prompt log-probabilities the engine already has (prompt positions 1..n are not scored again)."""
    prefill_only: bool = False
    """A shared prefix: computed once, then the sequences of one prompt fork from it."""


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's tokens to compute in this step, and what changed since the runner last saw it."""

    request_id: str
    start: int
    """Position of the first token to compute (the request's computed tokens so far)."""
    num_tokens: int
    samples: bool
    """The chunk ends at the request's last token: a token is sampled from it."""
    token_start: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    """Tokens that became known since the runner last saw the request, from index `token_start`.
    An input token past the runner's known tokens is in flight: the last launched step sampled it,
    and the runner takes it from that step's tokens on the device."""
    page_start: int = 0
    new_page_ids: list[int] = field(default_factory=list)
    """Pages allocated since, from index `page_start` of the request's page table."""


@dataclass(frozen=True)
class StepData:
    """One engine step for the runner (the engine's `SchedulerOutput` as plain data)."""

    scheduled: list[ScheduledChunk]
    """Decodes first (one token each), then prefill chunks."""
    num_decodes: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    """Requests that ended since the last step: the runner drops all their state."""
    preempted_ids: list[str] = field(default_factory=list)
    """Requests that lost their pages: the runner drops their tokens and page table but keeps
    their sampler generator and page selection state (a seeded request resumes its random stream)."""
    forks: list[ForkCopy] = field(default_factory=list)
    """Device copies to make before the step runs (sequences that start from a shared prefix)."""
    grammar_bitmask: np.ndarray | None = None
    """(sampling rows, ceil(vocab / 32)) int32 of allowed tokens for rows under a grammar (-1:
    every token), in the order of the sampling chunks; None when no row is constrained."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.scheduled)
