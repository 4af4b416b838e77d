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
from lserve.entrypoints.openai.serving import OpenAIServing
from lserve.request import CompletionOutput, RequestOutput
from lserve.sampling_params import SamplingParams

POISON = 13  # a prompt made of this token id makes the fake engine's next step fail


class FakeEngine:
    """The slice of LLMEngine the server uses; every step adds an "x" to each request's text."""

    max_model_len = 64
    tokenizer = None

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


async def _with_app(test: Any) -> None:
    fake = FakeEngine()
    holder: dict[str, AsyncEngine] = {}
    metrics = ServerMetrics("fake", lambda: holder["engine"].stats)
    engine = holder["engine"] = AsyncEngine(fake, metrics)  # type: ignore[arg-type]
    serving = OpenAIServing(engine, ["fake"], "fake")
    app = build_app(ServerState(engine, serving, metrics, api_key=None))
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
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
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
