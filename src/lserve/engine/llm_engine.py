"""LLMEngine: the core plus tokenization, detokenization, stop strings and RequestOutputs.

The offline `LLM` class and the server both drive this object: add requests, call `step()`
until nothing is left, abort what is no longer wanted.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from lserve.config import EngineConfig
from lserve.engine.core import EngineCore
from lserve.engine.stats import EngineStats
from lserve.engine.tokenizer import (
    IncrementalDetokenizer,
    Prompt,
    encode_prompt,
    load_tokenizer,
    prompt_text,
    render_chat,
)
from lserve.errors import RequestRejected
from lserve.runner.structured import GrammarCompiler
from lserve.request import (
    CompletionOutput,
    Logprob,
    Request,
    RequestOutput,
    RequestStatus,
    TokenLogprobEntry,
    TokenLogprobs,
)
from lserve.sampling_params import SamplingParams

__all__ = ["LLMEngine", "Prompt"]


@dataclass
class _Tracked:
    request: Request
    prompt: str | None
    detok: IncrementalDetokenizer | None
    first_token_time: float | None = None
    last_token_time: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """The request's output log-probabilities as returned, built once per token."""
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(self.core.source)
        self.eos_token_ids = frozenset(self.core.arch.eos_token_ids) | self._tokenizer_eos()
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._grammars: GrammarCompiler | None = None
        """Built on the first request with structured outputs."""

    def _tokenizer_eos(self) -> frozenset[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return frozenset([eos]) if isinstance(eos, int) else frozenset()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def last_step_num_tokens(self) -> int:
        """Tokens (prompt and decode) of the batch the last `step()` launched."""
        return self.core.last_step_num_tokens

    def next_request_id(self) -> str:
        """A fresh request id (the engine's own counter)."""
        return str(next(self._ids))

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, messages, add_generation_prompt)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> str:
        """Validate and queue a request; raises RequestRejected (nothing queued) when it cannot be served.

        `add_special_tokens=False` is for text that already carries them (a rendered chat template).
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise RequestRejected("LLMEngine.add_request takes one sequence (n=1); use add_parallel_requests "
                                  "for n > 1 (LLM.generate does)")
        ids = self.encode(prompt, add_special_tokens)
        request_id = request_id if request_id is not None else self.next_request_id()
        request = self._make_request(request_id, ids, params, prompt_text(prompt))
        try:
            self.core.add_request(request)
        except BaseException:
            del self._tracked[request_id]
            raise
        return request_id

    def add_parallel_requests(
        self,
        prompt: Prompt,
        params: list[SamplingParams],
        request_ids: list[str],
        add_special_tokens: bool = True,
    ) -> list[str]:
        """Queue several sequences of one prompt (`n` > 1), one request id each: the prompt's KV
        is computed once and shared (`EngineCore.add_forked_requests`). All or none are queued."""
        if len(params) != len(request_ids) or not params:
            raise ValueError("give one request id per sampling params")
        if any(p.n != 1 for p in params):
            raise RequestRejected("each sequence of a parallel request takes n=1")
        ids = self.encode(prompt, add_special_tokens)
        requests: list[Request] = []
        try:
            for rid, p in zip(request_ids, params):
                requests.append(self._make_request(rid, ids, p, prompt_text(prompt)))
            self.core.add_forked_requests(requests)
        except BaseException:
            for r in requests:
                del self._tracked[r.request_id]
            raise
        return request_ids

    def _make_request(self, request_id: str, ids: list[int], params: SamplingParams, text: str | None) -> Request:
        """Validate one sequence and track it (the caller queues it in the core)."""
        if request_id in self._tracked:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        request = self.core.make_request(request_id, ids, params, self.eos_token_ids)
        if params.structured_outputs is not None:
            request.structured = self._grammar_compiler().matcher(params.structured_outputs)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop_strings, params.skip_special_tokens,
                                           params.include_stop_str_in_output)
        self._tracked[request_id] = _Tracked(request, text, detok)
        return request

    def _grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise RequestRejected("structured outputs need the model's tokenizer; this model has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.core.arch.vocab_size, sorted(self.eos_token_ids))
        return self._grammars

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request (its pages are freed at once); returns its final output, if it was known."""
        tracked = self._tracked.pop(request_id, None)
        self.core.abort_request(request_id)
        if tracked is None:
            return None
        tracked.request.status = RequestStatus.FINISHED_ABORTED
        return self._output(tracked)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def get_stats(self) -> EngineStats:
        """Queue sizes, KV cache use, token/preemption counters and sparse-attention statistics."""
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that got a token (or finished)."""
        result = self.core.step()
        now = time.monotonic()
        outputs = []
        for req in result.changed:
            tracked = self._tracked.get(req.request_id)
            if tracked is None:
                continue
            if tracked.first_token_time is None:
                tracked.first_token_time = now
            tracked.last_token_time = now
            if tracked.detok is not None:
                hit_stop = tracked.detok.add(req.output_token_ids[-1:], final=req.is_finished,
                                             check_stops=len(req.output_token_ids) >= req.sampling_params.min_tokens)
                if hit_stop and not req.is_finished:
                    self.core.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                elif hit_stop:  # the stop string came with the last allowed token: still a stop
                    req.status = RequestStatus.FINISHED_STOPPED
            outputs.append(self._output(tracked))
            if req.is_finished:
                del self._tracked[req.request_id]
        if not self._tracked:
            self.core.drain()  # the step launched for requests that have finished since
        return outputs

    def _output(self, tracked: _Tracked) -> RequestOutput:
        req = tracked.request
        finished = req.is_finished
        reason = req.status.value if finished else None
        stop_reason: str | int | None = None
        if tracked.detok is not None and tracked.detok.stop_reason is not None:
            stop_reason = tracked.detok.stop_reason
        elif finished and req.status is RequestStatus.FINISHED_STOPPED and req.output_token_ids:
            last = req.output_token_ids[-1]  # vLLM's stop_reason: the stop token id (EOS or a grammar: None)
            stop_reason = last if last in (req.sampling_params.stop_token_ids or ()) else None
        text = tracked.detok.text if tracked.detok is not None else ""
        completion = CompletionOutput(0, text, list(req.output_token_ids), reason, stop_reason)
        params = req.sampling_params
        if params.logprobs is not None:
            for token, entry in zip(req.output_token_ids[len(tracked.logprobs):], req.output_logprobs[len(tracked.logprobs):]):
                tracked.logprobs.append(self._token_logprobs(token, entry))
                tracked.cumulative_logprob += entry[0]
            completion.logprobs = list(tracked.logprobs)
            completion.cumulative_logprob = tracked.cumulative_logprob
        metrics = {"arrival_time": req.arrival_time}
        if req.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = req.first_scheduled_time
        if tracked.first_token_time is not None and tracked.last_token_time is not None:
            metrics["first_token_time"] = tracked.first_token_time
            metrics["last_token_time"] = tracked.last_token_time
        if req.decode_pages_dense:  # the KV pages its decode steps read, against dense attention
            metrics["decode_pages_read"] = req.decode_pages_read
            metrics["decode_pages_dense"] = req.decode_pages_dense
            metrics["decode_pages_read_fraction"] = req.decode_pages_read / req.decode_pages_dense
        prompt_logprobs = None
        if params.prompt_logprobs is not None and len(req.prompt_logprobs) == req.num_prompt_tokens - 1:
            if not tracked.prompt_logprobs:
                tracked.prompt_logprobs = [None] + [
                    self._token_logprobs(token, entry)
                    for token, entry in zip(req.prompt_token_ids[1:], req.prompt_logprobs)]
            prompt_logprobs = tracked.prompt_logprobs
        return RequestOutput(req.request_id, tracked.prompt, req.prompt_token_ids, [completion], finished, metrics,
                             prompt_logprobs, req.num_cached_tokens)

    def _token_logprobs(self, token: int, entry: TokenLogprobEntry) -> TokenLogprobs:
        """vLLM's per-position dict: the chosen token first, then the top k by rank."""
        logprob, rank, top = entry
        out = {token: Logprob(logprob, rank, self._decode_one(token))}
        for i, (tid, value) in enumerate(top):
            if tid not in out:
                out[tid] = Logprob(value, i + 1, self._decode_one(tid))
        return out

    def _decode_one(self, token: int) -> str | None:
        return None if self.tokenizer is None else str(self.tokenizer.decode([token]))
