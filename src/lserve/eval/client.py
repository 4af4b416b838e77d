"""A small client for OpenAI-compatible servers: streaming completions with client-side timings.

Used by `lserve eval --base-url` (answers) and `lserve bench --base-url` (TTFT, ITL, ...). It
speaks plain HTTP with httpx: `POST {base}/v1/completions` or `/v1/chat/completions` with
`"stream": true`, reading server-sent events (`data: {...}` lines, ended by `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT_S = 6 * 3600.0


def normalize_base_url(url: str) -> str:
    """`http://host:port`, with or without a trailing `/v1`, -> `http://host:port` (no slash)."""
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"bad --base-url {url!r}: expected http://HOST:PORT")
    base = url.strip().rstrip("/")
    return base.removesuffix("/v1")


@dataclass
class StreamResult:
    """One streamed request as the client saw it (times in seconds, from `time.perf_counter`)."""

    ok: bool = False
    text: str = ""
    error: str = ""
    start: float = 0.0
    ttft: float | None = None
    """Seconds from sending to the first chunk carrying text."""
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    """Gaps between consecutive text-carrying chunks."""
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    """From the server's `usage` when it sends one."""


def _chunk_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return str(choice.get("text") or "")
    delta = choice.get("delta") or {}
    return str(delta.get("content") or "")


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> StreamResult:
    """Send one streaming request and time its chunks; failures are returned, not raised."""
    import httpx

    result = StreamResult(start=time.perf_counter())
    last = result.start
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    result.error = _error_message(json.dumps(obj))
                    return result
                usage = obj.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                text = _chunk_text(obj)
                if not text:
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - result.start
                else:
                    result.itls.append(now - last)
                result.chunk_times.append(now)
                last = now
                parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - result.start
    result.text = "".join(parts)
    result.ok = True
    return result


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:300]
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message", err))[:300]
    return str(err)[:300]


def completion_payload(model: str, prompt: str | list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """Body of a streaming `/v1/completions` request (greedy unless `extra` says otherwise)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update(extra)
    return body


def chat_payload(model: str, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """Body of a streaming `/v1/chat/completions` request."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update(extra)
    return body


def served_model_name(base: str, timeout_s: float = 30.0) -> str:
    """The first model id of `GET {base}/v1/models`; a clear error when the server cannot be reached."""
    import httpx

    try:
        resp = httpx.get(f"{base}/v1/models", timeout=timeout_s)
        resp.raise_for_status()
        models = resp.json().get("data") or []
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"cannot get the model name from {base}/v1/models ({type(exc).__name__}: {exc}); "
            "is the server up? pass --served-model-name to skip this check"
        ) from exc


async def run_requests(
    url: str,
    payloads: Sequence[dict[str, Any]],
    max_concurrency: int,
    *,
    delays: Sequence[float] | None = None,
    on_done: Callable[[int, StreamResult], None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[StreamResult]:
    """Send every payload, at most `max_concurrency` in flight; request i starts `delays[i]` s after the first."""
    import httpx  # imported here: the in-process tools work without it

    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    gate = asyncio.Semaphore(max_concurrency)
    results: list[StreamResult | None] = [None] * len(payloads)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:

        async def one(i: int) -> None:
            if delays is not None:
                await asyncio.sleep(max(0.0, t0 + delays[i] - time.perf_counter()))
            async with gate:
                results[i] = await stream_request(client, url, payloads[i])
            if on_done is not None:
                on_done(i, results[i])  # type: ignore[arg-type]

        tasks: list[Awaitable[None]] = [one(i) for i in range(len(payloads))]
        await asyncio.gather(*tasks)
    return [r for r in results if r is not None]
