"""A minimal OpenAI-compatible server for client tests: streams SSE chunks in OpenAI's format.

It serves `GET /v1/models`, and `POST /v1/completions` and `/v1/chat/completions` with
`"stream": true`. The reply text comes from a function of the prompt, sent word by word with a
short pause between chunks; with `ignore_eos` it sends exactly `max_tokens` chunks. A prompt
containing "REJECT ME" (or any prompt, with `reject_all`) gets an HTTP 400 in OpenAI's error shape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubServer:
    def __init__(
        self, answer: Callable[[str], str], chunk_delay_s: float = 0.002, model: str = "stub-model",
        reject_all: bool = False,
    ) -> None:
        self.answer = answer
        self.reject_all = reject_all
        self.chunk_delay_s = chunk_delay_s
        self.model = model
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                chat = self.path == "/v1/chat/completions"
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
                if "REJECT ME" in text or stub.reject_all:
                    self._json(400, {"error": {"message": "prompt is too long", "type": "BadRequestError"}})
                    return
                pieces = _pieces(stub.answer(text))
                if body.get("ignore_eos"):
                    pieces = [f" w{i}" for i in range(body["max_tokens"])]
                pieces = pieces[: body.get("max_tokens", len(pieces))]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in pieces:
                    choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                    self._event({"id": "x", "object": "chunk", "model": stub.model, "choices": [choice]})
                    time.sleep(stub.chunk_delay_s)
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(pieces)}
                    self._event({"id": "x", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, obj: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StubServer:  # noqa: PYI034 (a final-enough test helper)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []
