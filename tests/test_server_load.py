"""Load: 64 concurrent streaming clients with mixed prompt lengths on one server, a quarter of
them leaving (mid-stream, or before their first token). Every other request must produce the same
text as when it ran on its own; afterwards no request runs or waits, every KV page is free (seen
through /metrics) and the server still answers. The pool (64 pages) is smaller than the load
needs, so requests also queue.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.server_helpers import API_KEY, RemoteServer

NUM_CLIENTS = 64
MAX_TOKENS = 8
LEAVER_MAX_TOKENS = 256  # leavers would hold their pages for a long time if they were not aborted
TIME_LIMIT_S = 300.0

_SENTENCE = "The river wound through the valley past old mills until it reached the sea. "
PROMPTS = [  # about 5 to 110 tokens
    "The capital of France is",
    "def fibonacci(n):",
    "List three colours of the rainbow:",
    _SENTENCE + "Where did the river end?",
    _SENTENCE * 2 + "Summarise this in one sentence:",
    _SENTENCE * 3 + "What did the river pass?",
    _SENTENCE * 4 + "The mills",
    _SENTENCE * 6 + "Once upon a time",
]


def _body(prompt: str, chat: bool, max_tokens: int, stream: bool, **extra: Any) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if chat:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **body}
    return "/v1/completions", {"prompt": prompt, **body}


async def _reference(c: httpx.AsyncClient, prompt: str, chat: bool) -> tuple[str, str]:
    path, body = _body(prompt, chat, MAX_TOKENS, stream=False)
    r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]


async def _client(c: httpx.AsyncClient, i: int) -> dict[str, Any]:
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = (i // len(PROMPTS)) % 2 == 1
    leaves_early = i % 16 == 3  # 4 clients: gone before their first token
    leaves_mid = i % 4 == 3 and not leaves_early  # 12 clients: gone after a few chunks
    if leaves_early or leaves_mid:
        path, body = _body(prompt, chat, LEAVER_MAX_TOKENS, stream=True, ignore_eos=True)
    else:
        path, body = _body(prompt, chat, MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    result: dict[str, Any] = {"i": i, "prompt": prompt, "chat": chat, "text": "", "finish_reason": None,
                              "usage": None, "done": False, "left": leaves_early or leaves_mid}
    async with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        if leaves_early:
            return result
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result["done"] = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            events += 1
            if leaves_mid and events >= 3:
                return result
            if chunk.get("usage") and not chunk["choices"]:
                result["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                result["text"] += choice["delta"].get("content", "") if chat else choice["text"]
                result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
    return result


async def _run(server: RemoteServer) -> tuple[dict[tuple[str, bool], tuple[str, str]], list[dict[str, Any]]]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 8, max_keepalive_connections=NUM_CLIENTS + 8)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=TIME_LIMIT_S, limits=limits) as c:
        keys = [(p, chat) for p in PROMPTS for chat in (False, True)]
        refs = await asyncio.gather(*(_reference(c, p, chat) for p, chat in keys))
        results = await asyncio.gather(*(_client(c, i) for i in range(NUM_CLIENTS)))
    return dict(zip(keys, refs)), list(results)


def test_64_streaming_clients_a_quarter_leaving(lserve_server: RemoteServer) -> None:
    aborts_before = lserve_server.metrics()["vllm:request_success_total{abort}"]
    references, results = asyncio.run(asyncio.wait_for(_run(lserve_server), TIME_LIMIT_S))

    leavers = [r for r in results if r["left"]]
    assert len(leavers) == NUM_CLIENTS // 4
    for r in results:
        if r["left"]:
            continue
        text, finish_reason = references[(r["prompt"], r["chat"])]
        assert r["done"], r
        assert (r["text"], r["finish_reason"]) == (text, finish_reason), (r["i"], r["chat"], r["prompt"][:40])
        assert 0 < r["usage"]["completion_tokens"] <= MAX_TOKENS

    m = lserve_server.wait_idle(timeout=60)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["lserve:kv_cache_pages_used"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total{abort}"] == aborts_before + len(leavers)
    after = httpx.post(lserve_server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}, timeout=60)
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == references[(PROMPTS[0], False)][0]
    assert httpx.get(lserve_server.url + "/health").status_code == 200
