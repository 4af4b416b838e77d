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

    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    returncode = server.proc.wait(GRACE_S + 30)
    took = time.monotonic() - sent
    for t in threads:
        t.join(30)

    assert returncode in (0, -signal.SIGTERM), server.log()
    assert took < GRACE_S + 15, f"exit took {took:.1f} s"
    for out, reason in ((short_out, "length"), (long_out, "abort")):
        assert out["status"] == 200 and "error" not in out, out
        assert out["events"][-1] == "[DONE]", out["events"][-3:]
        assert json.loads(out["events"][-2])["choices"][0]["finish_reason"] == reason
    assert "engine stopped" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
