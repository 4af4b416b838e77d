"""Request state inside the engine and the outputs handed back to callers (vLLM's names)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from lserve.sampling_params import SamplingParams

TokenLogprobEntry = tuple[float, int, list[tuple[int, float]]]
"""A position's log-probability of its token, the token's rank and the top-k (id, logprob), as a
step computes them (`CompletionOutput.logprobs` holds them as `Logprob` objects)."""

INFLIGHT_TOKEN = -1
"""The id `Request.token_ids` gives a token that a running step has sampled but not yet returned."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    """One sequence being generated.

    The scheduling rule (vLLM's): `num_computed_tokens` catches up with `num_tokens`; prefill,
    chunked prefill, recompute after preemption and decode are all the same operation.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    error: str | None = None
    structured: Any = None
    """With `structured_outputs`: the grammar matcher that masks its tokens and consumes each one
    (`lserve.runner.structured`); the request stops once the grammar is complete."""
    first_scheduled_time: float | None = None
    """When it first left the waiting queue (monotonic seconds; for the queue-time metric)."""
    decode_pages_read: int = 0
    """KV pages (over layers and KV heads) its decode steps read; see `decode_pages_dense`."""
    decode_pages_dense: int = 0
    """The pages the same decode steps would read with dense attention."""
    output_logprobs: list[TokenLogprobEntry] = field(default_factory=list)
    """With `logprobs`: per output token, its log-probability, its rank and the top-k (id, logprob)."""
    prompt_logprobs: list[TokenLogprobEntry] = field(default_factory=list)
    """With `prompt_logprobs`: the same for prompt tokens 1.. (filled as prefill chunks run)."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when it was first admitted (not computed)."""
    page_keys: list[bytes] = field(default_factory=list)
    """The prefix cache's keys of its first full pages, hashed as needed (`extend_page_keys`):
    its tokens never change, so a key, once made, holds for good."""
    prefill_only: bool = False
    """A shared prompt prefix: it computes its tokens' KV and samples nothing; the sequences of an
    `n` > 1 request fork from it (`fork_of`) and it is freed when the last has forked."""
    fork_of: str | None = None
    """Until it forks: the id of the prefill-only request whose KV this request will share."""
    num_inflight_tokens: int = 0
    """Tokens sampled by a step that is still running on the device (async scheduling): they count
    in `num_tokens`, so the next step can be scheduled before their values are known; the model
    runner reads their ids on the device. Resolved (appended) when that step's results arrive."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def needs_more_tokens(self) -> bool:
        """False once the tokens known and in flight reach `max_tokens` (it finishes on their arrival)."""
        return len(self.output_token_ids) + self.num_inflight_tokens < self.max_tokens

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of prompt + output, without building the whole list; tokens still in
        flight are `INFLIGHT_TOKEN`."""
        n = len(self.prompt_token_ids)
        known = n + len(self.output_token_ids)
        if stop > known:
            return self.token_ids(start, known) + [INFLIGHT_TOKEN] * (stop - max(start, known))
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions after a new token; stop strings are handled on text."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in (params.stop_token_ids or ()):
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None


@dataclass
class Logprob:
    """A token's log-probability under the model's raw distribution (vLLM's `Logprob`)."""

    logprob: float
    rank: int | None = None
    """1 for the most likely token."""
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]
"""One position: the chosen token's entry first, then the top-k tokens' (vLLM's order)."""


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    """With `SamplingParams.logprobs`: one entry per token of `token_ids`."""
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """What the engine reports for a request after a step (and at the end)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    """`arrival_time`, `first_scheduled_time`, `first_token_time`, `last_token_time` (monotonic
    seconds, once they happened); once the request has decoded,
    `decode_pages_read` and `decode_pages_dense` (KV pages over layers and KV heads that its
    decode steps read, and would read with dense attention) and their ratio
    `decode_pages_read_fraction`."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With `SamplingParams.prompt_logprobs`: one entry per prompt token, None for the first."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (`enable_prefix_caching`)."""
