"""SIGTERM: open requests get `--shutdown-timeout` seconds; one that finishes in time completes
normally, one that cannot is aborted with a clean end of stream (finish_reason "abort", then
`[DONE]`); the engine stops and the process exits promptly, refusing new connections.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.server_helpers import RemoteServer

GRACE_S = 4.0


def _stream(url: str, body: dict[str, Any], first_event: threading.Event, out: dict[str, Any]) -> None:
    """Read a stream to its end in a thread: its events, and whether the connection ended cleanly."""
    events: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first_event.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        out["events"] = events
        first_event.set()


def _sigterm(server: RemoteServer, threads: list[threading.Thread], wait_s: float) -> tuple[int, float]:
    """SIGTERM the server, wait for it to exit and for the client threads: (return code, seconds to exit)."""
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    returncode = server.proc.wait(wait_s)
    took = time.monotonic() - sent
    for t in threads:
        t.join(30)
    return returncode, took


def _assert_stream_ended(out: dict[str, Any], reason: str) -> None:
    """A whole stream: status 200, a last chunk with `reason`, then `[DONE]`."""
    assert out.get("status") == 200 and "error" not in out, out
    assert out["events"][-1] == "[DONE]", out["events"][-3:]
    assert json.loads(out["events"][-2])["choices"][0]["finish_reason"] == reason


@pytest.fixture
def server():
    server = RemoteServer("--dtype", "float32", "--device", "cpu", "--max-model-len", "2048",
                          "--num-kv-pages", "32", "--shutdown-timeout", str(GRACE_S))
    yield server
    server.stop(signal.SIGKILL)


def test_sigterm_finishes_or_aborts_open_requests_and_exits(server: RemoteServer) -> None:
    long_out: dict[str, Any] = {}
    short_out: dict[str, Any] = {}
    long_started, short_started = threading.Event(), threading.Event()
    long_body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    short_body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    threads = [threading.Thread(target=_stream, args=(server.url, long_body, long_started, long_out)),
               threading.Thread(target=_stream, args=(server.url, short_body, short_started, short_out))]
    threads[0].start()
    assert long_started.wait(60)
    threads[1].start()
    assert short_started.wait(60)  # both are generating

    returncode, took = _sigterm(server, threads, GRACE_S + 30)
    assert returncode in (0, -signal.SIGTERM), server.log()
    assert took < GRACE_S + 15, f"exit took {took:.1f} s"
    for out, reason in ((short_out, "length"), (long_out, "abort")):
        _assert_stream_ended(out, reason)
    assert "engine stopped" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


def _complete(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        out["status"], out["body"] = r.status_code, r.json()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)


def test_sigterm_with_48_open_streams_ends_every_response_within_the_timeout() -> None:
    grace = 2.0
    server = RemoteServer("--dtype", "float32", "--device", "cpu", "--max-model-len", "4096",
                          "--num-kv-pages", "160", "--max-num-seqs", "64", "--shutdown-timeout", str(grace))
    try:
        streams = [{} for _ in range(48)]
        plain = [{} for _ in range(4)]
        started = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(server.url, {
            "prompt": f"Story number {i}:", "max_tokens": 3000, "ignore_eos": True, "temperature": 0},
            started[i], streams[i])) for i in range(48)]
        threads += [threading.Thread(target=_complete, args=(server.url, {
            "prompt": f"Essay number {i}:", "max_tokens": 3000, "ignore_eos": True}, plain[i])) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every request is in the engine, and streams are generating
            m = server.metrics()
            if m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] == 52 \
                    and sum(e.is_set() for e in started) >= 8:
                break
            time.sleep(0.2)
        assert sum(e.is_set() for e in started) >= 8

        returncode, took = _sigterm(server, threads, grace + 60)
        log = server.log()
        assert returncode in (0, -signal.SIGTERM), log
        # the grace period, one engine step of 48 sequences, and the process's own exit
        assert took < grace + 10, f"exit took {took:.1f} s"
        for out in streams:
            _assert_stream_ended(out, "abort")
        for out in plain:
            assert out.get("status") == 503, out
            assert out["body"]["error"]["type"] == "ServiceUnavailableError", out
        for bad in ("Traceback", "KeyError", "Application shutdown failed", "InvalidStateError"):
            assert bad not in log, log
    finally:
        server.stop(signal.SIGKILL)
