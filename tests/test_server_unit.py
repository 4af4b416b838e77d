"""The server's failure paths, in process, over a scripted fake engine (no model, no subprocess):
an engine that fails mid-step makes /health 503 and ends every request cleanly (503, or an error
event then `[DONE]` in a stream that had already started); nothing hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from lserve import cli
from lserve.engine.stats import EngineStats
from lserve.entrypoints.openai.api_server import ServerState, build_app
from lserve.entrypoints.openai.async_engine import AsyncEngine
from lserve.entrypoints.openai.metrics import ServerMetrics
from lserve.entrypoints.openai.serving import OpenAIServing, run_until_disconnect
from lserve.request import CompletionOutput, RequestOutput
from lserve.sampling_params import SamplingParams

POISON = 13  # a prompt made of this token id makes the fake engine's next step fail


class FakeEngine:
    """The slice of LLMEngine the server uses; every step adds an "x" to each request's text."""

    max_model_len = 64
    tokenizer = None
    last_step_num_tokens = 1

    def __init__(self) -> None:
        self.core = SimpleNamespace(arch=SimpleNamespace(vocab_size=100), device="cpu",
                                    source=SimpleNamespace(name="fake", path=Path("fake")))
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.aborted: list[str] = []

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else [ord(c) % 100 for c in prompt]

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str) -> str:
        self.requests[request_id] = (prompt, params, [])
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.aborted.append(request_id)
        entry = self.requests.pop(request_id, None)
        return None if entry is None else self._output(request_id, entry, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        time.sleep(0.01)  # a step takes time, as a real one does: streams stay open for a while
        if any(prompt == [POISON] for prompt, _, _ in self.requests.values()):
            raise RuntimeError("simulated kernel failure")
        outputs = []
        for rid, entry in list(self.requests.items()):
            entry[2].append(1)
            done = len(entry[2]) >= (entry[1].max_tokens or 1)
            outputs.append(self._output(rid, entry, "length" if done else None))
            if done:
                del self.requests[rid]
        return outputs

    @staticmethod
    def _output(rid: str, entry: tuple[list[int], SamplingParams, list[int]], reason: str | None) -> RequestOutput:
        tokens = list(entry[2])
        return RequestOutput(rid, None, entry[0], [CompletionOutput(0, "x" * len(tokens), tokens, reason)],
                             reason is not None)

    def get_stats(self) -> EngineStats:
        return EngineStats(len(self.requests), 0, 8, 0, 0.0, 1.0, 0, 0, 0, 0, 0, 0)


async def _with_app(test: Any, max_request_bytes: int = 2**20, tokenizer: Any = None,
                    max_model_len: int = 64) -> None:
    fake = FakeEngine()
    fake.max_model_len = max_model_len
    holder: dict[str, AsyncEngine] = {}
    metrics = ServerMetrics("fake", lambda: holder["engine"].stats)
    engine = holder["engine"] = AsyncEngine(fake, metrics)  # type: ignore[arg-type]
    serving = OpenAIServing(engine, ["fake"], "fake", max_prompts_per_request=4)
    if tokenizer is not None:
        serving.tokenizer, serving.max_prompt_chars = tokenizer, 1000
    app = build_app(ServerState(engine, serving, metrics, api_key=None, max_request_bytes=max_request_bytes))
    engine.start()  # the ASGI transport does not run the app's lifespan
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            await asyncio.wait_for(test(c, fake, engine), 30)
    finally:
        await engine.close()


def test_fake_engine_serves_requests() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        r = await c.post("/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 3})
        assert r.status_code == 200
        assert [ch["text"] for ch in r.json()["choices"]] == ["xxx", "xxx"]
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
                                     "prompt_tokens_details": None}  # (vLLM's null without cached tokens)
        assert fake.aborted == [] and engine.num_open_requests == 0  # finished requests are not aborted

    asyncio.run(_with_app(test))


def test_engine_failure_gives_503_and_health_503() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        assert (await c.get("/health")).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": [POISON], "max_tokens": 4})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and "simulated kernel failure" in error["message"]
        health = await c.get("/health")
        assert health.status_code == 503 and "dead" in health.json()["error"]["message"]
        again = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert again.status_code == 503
        assert (await c.get("/metrics")).status_code == 200  # still observable

    asyncio.run(_with_app(test))


def test_engine_failure_ends_open_streams_with_an_error_event() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        stream = asyncio.ensure_future(c.post("/v1/completions", json={
            "prompt": [1, 2], "max_tokens": 60, "stream": True}))
        while not fake.requests:  # the stream's request is in the engine
            await asyncio.sleep(0.01)
        poisoned = await c.post("/v1/completions", json={"prompt": [POISON], "max_tokens": 4})
        assert poisoned.status_code == 503
        r = await stream
        events = [block[len("data: "):] for block in r.text.split("\n\n") if block]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 503
        assert engine.num_open_requests == 0

    asyncio.run(_with_app(test))


def _serve_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `lserve serve ARGS` in process; it must fail with exit status 1 and one line on stderr."""
    assert cli.main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def keep_log_level():
    """`lserve serve` turns lserve's progress logging on; put the level back for later tests."""
    logger = logging.getLogger("lserve")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("keep_log_level")
def test_serve_cli_errors_are_one_line_and_quick(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        # the port is taken before the model loads: this fails at once, not after a minute of loading
        assert f"cannot listen on 127.0.0.1:{port}" in _serve_error(capsys, "--port", port)
    assert "--port" in _serve_error(capsys, "--port", "70000")
    assert "--shutdown-timeout" in _serve_error(capsys, "--shutdown-timeout", "-1")
    assert "two models" in _serve_error(capsys, "a.gguf", "--model", "b.gguf")
    assert "--max-request-bytes" in _serve_error(capsys, "--max-request-bytes", "0")
    assert "--max-prompts-per-request" in _serve_error(capsys, "--max-prompts-per-request", "0")


# ---- limits, the tokenizer thread, disconnects and shutdown -----------------------------------------


class SlowTokenizer:
    """Takes `delay` seconds per text, off the GIL (as the real one does); counts its calls."""

    chat_template = None

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        time.sleep(self.delay)
        return [ord(c) % 100 for c in text]


def _error(r: httpx.Response, status: int, param: str | None, needle: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["param"] == param and needle in error["message"], error


def test_body_size_and_prompt_count_limits() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        big = json.dumps({"prompt": [1] * 600}).encode()  # 1.8 KB
        _error(await c.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}),
               413, None, "larger than 1000 bytes")

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(4):
                yield big[:500]

        _error(await c.post("/tokenize", content=chunks(), headers={"Content-Type": "application/json"}),
               413, None, "larger than 1000 bytes")
        _error(await c.post("/v1/completions", json={"prompt": [[1]] * 5, "max_tokens": 1}), 400, "prompt",
               "at most 4 prompts")
        ok = await c.post("/v1/completions", json={"prompt": [[1]] * 4, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
        assert engine.num_open_requests == 0 and not fake.requests

    asyncio.run(_with_app(test, max_request_bytes=1000))


def test_a_long_prompt_is_refused_before_tokenizing_and_tokenizing_does_not_stall_steps() -> None:
    slow = SlowTokenizer(0.4)

    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        _error(await c.post("/tokenize", json={"prompt": "a" * 1001}), 400, "prompt", "1001 characters")
        assert slow.calls == 0  # the character bound alone refused it
        steps = 0
        real_step = fake.step

        def counting_step() -> list[RequestOutput]:
            nonlocal steps
            steps += 1
            return real_step()

        fake.step = counting_step  # type: ignore[method-assign]
        stream = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": [1], "max_tokens": 60,
                                                                       "stream": True}))
        while not fake.requests:
            await asyncio.sleep(0.01)
        before = steps
        r = await c.post("/tokenize", json={"prompt": "hello"})  # 0.4 s on the tokenizer thread
        assert r.status_code == 200 and r.json()["count"] == 5 and slow.calls == 1
        assert steps - before >= 10, f"only {steps - before} engine steps ran while a prompt was tokenized"
        assert (await stream).text.endswith("data: [DONE]\n\n")

    asyncio.run(_with_app(test, tokenizer=slow))


def test_lone_surrogate_is_400_everywhere() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        for path, body, param in (("/v1/completions", b'{"prompt": "a\\ud800", "max_tokens": 4}', "prompt"),
                                  ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 4}', "prompt.1"),
                                  ("/tokenize", b'{"prompt": "\\ud800"}', "prompt")):
            r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
            _error(r, 400, param, "lone surrogate (U+D")
        assert not fake.requests

    asyncio.run(_with_app(test, tokenizer=SlowTokenizer(0.0)))


def test_disconnect_before_the_response_is_499_without_an_error() -> None:
    aborted = asyncio.Event()

    async def work() -> Any:
        try:
            await asyncio.sleep(60)
        finally:
            aborted.set()  # a handler's `finally` aborts its engine requests

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        request = SimpleNamespace(receive=receive)
        response = await asyncio.wait_for(run_until_disconnect(request, work), 5)  # type: ignore[arg-type]
        assert response.status_code == 499 and aborted.is_set()

    asyncio.run(main())


def test_drain_aborts_every_open_request_in_one_job_and_ends_each_response() -> None:
    async def test(c: httpx.AsyncClient, fake: FakeEngine, engine: AsyncEngine) -> None:
        steps_at_abort: list[int] = []
        steps = 0
        real_step, real_abort = fake.step, fake.abort_request

        def counting_step() -> list[RequestOutput]:
            nonlocal steps
            steps += 1
            return real_step()

        def recording_abort(request_id: str) -> RequestOutput | None:
            steps_at_abort.append(steps)
            return real_abort(request_id)

        fake.step, fake.abort_request = counting_step, recording_abort  # type: ignore[method-assign]
        streams = [asyncio.ensure_future(c.post("/v1/completions", json={
            "prompt": [1, i], "max_tokens": 10_000, "stream": True})) for i in range(48)]
        plain = [asyncio.ensure_future(c.post("/v1/completions", json={"prompt": [2, i], "max_tokens": 10_000}))
                 for i in range(4)]
        while len(fake.requests) < 52:
            await asyncio.sleep(0.01)
        # a second drain while the first waits (the lifespan's close() during uvicorn's shutdown)
        await asyncio.gather(engine.drain(0.3), engine.drain(0.5), engine.drain(10.0))
        assert len(steps_at_abort) == 52 and len(set(steps_at_abort)) == 1  # one job, between two steps
        for r in await asyncio.gather(*streams):
            events = [block[len("data: "):] for block in r.text.split("\n\n") if block]
            assert r.status_code == 200 and events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        for r in await asyncio.gather(*plain):
            _error(r, 503, None, "shut down before the request finished")
        assert engine.num_open_requests == 0 and not fake.requests
        refused = await c.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
        _error(refused, 503, None, "shutting down")

    asyncio.run(_with_app(test, max_model_len=20_000))
