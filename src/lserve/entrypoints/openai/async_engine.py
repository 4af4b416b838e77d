"""AsyncEngine: the synchronous `LLMEngine` driven from asyncio, shared by every HTTP request.

The engine (torch, tokenizer) is not thread-safe, so one worker thread owns it: every call
(tokenize, add, abort, step, stats) is a job on a single-thread executor and runs in submission
order. One asyncio task, the engine loop, submits `step()` jobs back to back while any request is
unfinished, so all concurrent HTTP requests share each step (continuous batching); jobs that
handlers submit meanwhile (admitting or aborting requests) run between two steps. Each step's
outputs go to per-request asyncio queues. The event loop itself never blocks on the engine.
Tokenizing and rendering chat templates run on a second thread (`run_tokenizer`), so a long
prompt being tokenized never holds up the steps of the requests already running (the
tokenizer releases the GIL while it works).

A request's stream is registered before the request reaches the engine, so no output can be
missed, and removed when its final output is delivered or when it is aborted. Aborting is a
plain function (usable from `finally` blocks while a task is being cancelled): it queues the
engine's `abort_request`, which frees the request's KV pages as soon as the running step ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from lserve.engine.stats import EngineStats
from lserve.request import RequestOutput
from lserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lserve.engine.llm_engine import LLMEngine
    from lserve.entrypoints.openai.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until the server is restarted."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new requests."""


@dataclass
class RequestStream:
    """Outputs of one engine request, in order; the last one has `finished=True`."""

    request_id: str
    arrival_time: float
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_tokens: int = 0
    finished: bool = False
    aborted_for_shutdown: bool = False
    """The server's shutdown aborted it (its final output has finish_reason "abort")."""

    async def next(self) -> RequestOutput:
        """The newest output; outputs already queued behind the first one are skipped over.

        Outputs are cumulative (all text and tokens so far), so a slow reader loses nothing by
        taking only the newest one.
        """
        item = await self.queue.get()
        while not self.queue.empty() and not isinstance(item, BaseException):
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    """Owns the engine thread and the engine loop; see the module docstring."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lserve-engine")
        self._tokenizer_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lserve-tokenizer")
        self._streams: dict[str, RequestStream] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead_reason: str | None = None
        self.accepting = True
        self._drain_task: asyncio.Future[None] | None = None
        self._drain_deadline = float("inf")
        # Refreshed by the engine thread after every job that changes engine state; read by /metrics
        # without waiting for a running step.
        self.stats: EngineStats = engine.get_stats()

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine loop on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._run_loop(), name="lserve-engine-loop")

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests, let open ones finish for up to `grace_s`, then abort the rest.

        Aborted requests still get a final output (finish_reason "abort"), so their clients see
        a complete response rather than a cut connection. Every request left is aborted in one
        engine job, after the step that is running. Calls while a drain runs join it; a shorter
        grace period moves its deadline forward.
        """
        self.accepting = False
        self._drain_deadline = min(self._drain_deadline, time.monotonic() + grace_s)
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        # shielded: a caller that is cancelled (uvicorn's shutdown) must not stop the drain halfway
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        while self._streams and time.monotonic() < self._drain_deadline and not self.is_dead:
            await asyncio.sleep(0.05)
        if not self._streams:
            return
        logger.info("aborting %d unfinished request(s) for shutdown", len(self._streams))
        streams, self._streams = self._streams, {}
        finals: dict[str, RequestOutput | None] = {}
        try:
            finals = await self.run(self._abort_all, list(streams))
        except EngineDeadError:
            pass
        for request_id, stream in streams.items():
            final = finals.get(request_id)
            if final is not None:
                stream.aborted_for_shutdown = True
                self._count_finish(stream, final)
                stream.queue.put_nowait(final)
            else:
                stream.queue.put_nowait(EngineDeadError(self.dead_reason or "the server stopped"))

    async def close(self) -> None:
        """Abort whatever is left, stop the loop and the engine thread (after its current job)."""
        await self.drain(0.0)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._tokenizer_executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))

    # ---- running jobs on the engine thread -----------------------------------------------------

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], refresh: bool) -> T:
        try:
            return fn(*args)
        finally:
            if refresh:
                self.stats = self.engine.get_stats()

    async def run(self, fn: Callable[..., T], *args: Any, refresh_stats: bool = True) -> T:
        """Run `fn(*args)` on the engine thread, after the jobs already queued."""
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._job, fn, args, refresh_stats)

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (tokenizer work) on the tokenizer thread, after the jobs queued there."""
        if self.is_dead:  # as `run`: a request to a dead engine is answered 503 before any work
            raise EngineDeadError(self.dead_reason)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_executor, fn, *args)

    # ---- requests --------------------------------------------------------------------------------

    async def add_requests(
        self, requests: Sequence[tuple[str, list[int], SamplingParams]], arrival_time: float, group_size: int = 1,
    ) -> list[RequestStream]:
        """Queue requests (id, prompt token ids, params) all or none; RequestRejected if one is refused.
        With `group_size` k > 1, each run of k requests shares one prompt (n choices): its KV is
        computed once (`LLMEngine.add_parallel_requests`)."""
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down")
        streams = [RequestStream(rid, arrival_time) for rid, _, _ in requests]
        for s in streams:
            self._streams[s.request_id] = s
        ids = [s.request_id for s in streams]
        try:
            await self.run(self._add_all, list(requests), group_size)
        except asyncio.CancelledError:
            # The client left while the job was queued: the abort job runs after the add job, so
            # nothing the add job queued survives.
            self.abort(ids)
            raise
        except BaseException:
            for rid in ids:  # refused: `_add_all` has already taken back what it added
                self._streams.pop(rid, None)
            raise
        assert self._wake is not None, "start() was not called"
        self._wake.set()
        return streams

    def _add_all(self, requests: list[tuple[str, list[int], SamplingParams]], group_size: int = 1) -> None:
        added: list[str] = []
        try:
            for start in range(0, len(requests), group_size):
                group = requests[start:start + group_size]
                if len(group) == 1:
                    rid, ids, params = group[0]
                    self.engine.add_request(ids, params, request_id=rid)
                else:
                    self.engine.add_parallel_requests(group[0][1], [g[2] for g in group], [g[0] for g in group])
                added.extend(g[0] for g in group)
        except BaseException:
            for rid in added:
                self.engine.abort_request(rid)
            raise

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests that are still open; finished or unknown ids are skipped (no engine job)."""
        open_ids = [rid for rid in request_ids if rid in self._streams]
        for rid in open_ids:
            stream = self._streams.pop(rid)
            if self.metrics is not None:
                self.metrics.request_finished("abort", stream, time.monotonic())
        if not open_ids or self.is_dead:
            return
        try:
            future: Future[dict[str, RequestOutput | None]] = self._executor.submit(self._job, self._abort_all, (open_ids,), True)
        except RuntimeError:  # the executor is already shut down: nothing is running any more
            return
        future.add_done_callback(_log_job_failure)

    def _abort_all(self, request_ids: list[str]) -> dict[str, RequestOutput | None]:
        return {rid: self.engine.abort_request(rid) for rid in request_ids}

    # ---- the engine loop -----------------------------------------------------------------------

    def _step(self) -> list[RequestOutput] | None:
        """One engine step, or None when there is nothing to do (runs on the engine thread)."""
        if not self.engine.has_unfinished_requests():
            return None
        outputs = self.engine.step()
        if self.metrics is not None:  # the registry is thread-safe
            self.metrics.step_done(self.engine.last_step_num_tokens)
        return outputs

    async def _run_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                outputs = await loop.run_in_executor(self._executor, self._job, self._step, (), True)
            except Exception as exc:  # noqa: BLE001 (a fault in the engine: nothing can be trusted any more)
                self._die(exc)
                return
            if outputs is None:
                await self._wake.wait()
                continue
            self._dispatch(outputs, time.monotonic())

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted while the step ran
                continue
            num_tokens = len(out.outputs[0].token_ids)
            new_tokens = num_tokens - stream.num_tokens
            if new_tokens > 0 and self.metrics is not None:
                self.metrics.tokens_arrived(stream, now, new_tokens)
            if new_tokens > 0:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                stream.last_token_time = now
                stream.num_tokens = num_tokens
            if out.finished:
                del self._streams[out.request_id]
                self._count_finish(stream, out)
            stream.queue.put_nowait(out)

    def _count_finish(self, stream: RequestStream, out: RequestOutput) -> None:
        stream.finished = True
        if self.metrics is not None:
            self.metrics.request_finished(out.outputs[0].finish_reason or "abort", stream, time.monotonic(), out)

    def _die(self, exc: BaseException) -> None:
        logger.error("the engine failed; every open request is ended and /health reports 503",
                     exc_info=(type(exc), exc, exc.__traceback__))
        self.dead_reason = f"the engine failed: {type(exc).__name__}: {exc}"
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(self.dead_reason))
        self._streams.clear()


def _log_job_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        logger.error("an abort job failed", exc_info=(type(exc), exc, exc.__traceback__))
