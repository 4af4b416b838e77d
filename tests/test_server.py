"""`lserve serve` as clients use it: a real server process on localhost, the official `openai`
package and raw HTTP. Completions, chat, streaming (chunks, finish_reason, usage, `[DONE]`),
the small endpoints, every error case of the issue, and client disconnects freeing KV pages.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

import lserve
from tests.server_helpers import API_KEY, MODEL_ALIAS, MODEL_NAME, RemoteServer

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_MODEL_LEN = 2048  # as started by tests.server_helpers.DEFAULT_ARGS


@pytest.fixture(scope="module")
def client(lserve_server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=lserve_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(lserve_server: RemoteServer):
    with httpx.Client(base_url=lserve_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as c:
        yield c


def greedy(client: openai.OpenAI, prompt: str | list[int] = PROMPT, max_tokens: int = 8, **kw) -> str:
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].text


def token_count(http: httpx.Client, **body) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def sse_events(http: httpx.Client, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed response, checking the wire format on the way."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", "every event ends with a blank line"
    assert all(b.startswith("data: ") for b in blocks[:-1]), raw
    return [b[len("data: "):] for b in blocks[:-1]]


# ---- completions ---------------------------------------------------------------------------------


def test_models_lists_every_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME, MODEL_ALIAS]
    assert all(m.owned_by == "lserve" and m.model_extra["max_model_len"] == MAX_MODEL_LEN for m in models)


def test_completion_text_finish_reason_and_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and "Paris" in choice.text
    assert r.usage.prompt_tokens == token_count(http, prompt=PROMPT)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the alias serves the same model; greedy decoding is deterministic
    by_alias = client.completions.create(model=MODEL_ALIAS, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_alias.model == MODEL_ALIAS and by_alias.choices[0].text == choice.text


def test_stop_string_ends_output_in_both_modes(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=10)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    # streaming holds back text that could still become the stop string: none of it leaks
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_chunks_and_usage(client: openai.OpenAI) -> None:
    expected = greedy(client, max_tokens=12)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 1, "the text arrives in several chunks"
    assert all(c.object == "text_completion" and c.usage is None for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 12


def test_stream_wire_format_ends_with_done(http: httpx.Client) -> None:
    events = sse_events(http, "/v1/completions",
                        {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_prompt_forms_token_ids_batches_and_echo(client: openai.OpenAI, http: httpx.Client) -> None:
    text = greedy(client)
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert greedy(client, ids) == text
    other = "def fibonacci(n):"
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, other], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [text, greedy(client, other)]
    assert r.usage.prompt_tokens == len(ids) + token_count(http, prompt=other)
    assert r.usage.completion_tokens == 16
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + text


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                         top_p=0.95, seed=seed, extra_body={"top_k": 50}).choices[0].text
    assert sample(1234) == sample(1234)


# ---- chat ------------------------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == token_count(http, messages=CHAT)
    assert 0 < r.usage.completion_tokens <= 16


def test_chat_stream(client: openai.OpenAI) -> None:
    expected = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=16,
                                              temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    *choice_chunks, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == expected.choices[0].message.content
    assert choice_chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == expected.usage.model_dump()


# ---- the other endpoints ---------------------------------------------------------------------------


def test_health_version_tokenizer(http: httpx.Client) -> None:
    health = httpx.get(str(http.base_url) + "/health")  # no API key needed for probes
    assert health.status_code == 200 and health.content == b""
    assert http.get("/version").json() == {"version": lserve.__version__}
    ids = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": "Hello world"}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"]


def test_metrics_names(lserve_server: RemoteServer, http: httpx.Client) -> None:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    label = f'model_name="{MODEL_NAME}"'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total",
                 "lserve:streaming_heads_fraction", "lserve:decode_pages_read_fraction",
                 "lserve:kv_cache_pages_total", "lserve:kv_cache_pages_used",
                 "vllm:request_queue_time_seconds_bucket", "vllm:request_prefill_time_seconds_bucket",
                 "vllm:request_decode_time_seconds_bucket", "vllm:request_inference_time_seconds_bucket",
                 "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
                 "vllm:iteration_tokens_total_bucket"):
        assert any(line.startswith(name + "{") and label in line for line in r.text.splitlines()), name
    before = lserve_server.metrics()
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    after = lserve_server.metrics()
    usage = r.json()["usage"]
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["vllm:request_success_total{length}"] == before["vllm:request_success_total{length}"] + 1
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 1
    assert after["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"] == 4
    assert after["lserve:kv_cache_pages_total"] == 64 and after["lserve:streaming_heads_fraction"] == 0
    for phase in ("queue", "prefill", "decode", "inference"):
        name = f"vllm:request_{phase}_time_seconds_count"
        assert after[name] == before[name] + 1, name
    assert after["vllm:request_generation_tokens_sum"] - before["vllm:request_generation_tokens_sum"] == 5
    assert after["vllm:request_prompt_tokens_sum"] - before["vllm:request_prompt_tokens_sum"] == usage["prompt_tokens"]
    # every token of the request went through some step: its prompt and its 5 decode steps (at least)
    assert after["vllm:iteration_tokens_total_sum"] - before["vllm:iteration_tokens_total_sum"] >= \
        usage["prompt_tokens"] + 4


# ---- bad input ---------------------------------------------------------------------------------------

LONG_TEXT = "hello world " * 1100  # about 2200 tokens: over the 2048-token context

ERROR_CASES = [
    # (path, raw body or JSON, status, param, text in the message)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 4', 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2, 3]", 400, None, "dictionary or object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "Field required"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages", "Field required"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "valid string"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "role"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k", "greater than or equal to -1"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "at least 1 character"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "finite number"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "must not be empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "must not be empty"),
    ("/v1/completions", {"prompt": ["ok", ""]}, 400, "prompt.1", "must not be empty"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "must not be empty"),
    ("/v1/completions", {"prompt": [7, 10**9]}, 400, "prompt", "out of the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 129}, 400, "n",
     "less than or equal to 128"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of", "greater than or equal to n"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, 400, "best_of", "cannot be used with stream"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": -1}, 400, "prompt_logprobs", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty", "greater than or equal"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 3, "max_tokens": 2}, 400, "min_tokens", "[0, max_tokens]"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "must be token ids"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "less than or equal to 100"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias", "out of the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only be defined when `stream=True`"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "less than or equal to 20"),
    ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 1}, 400, "prompt_logprobs",
     "only supported by /v1/completions"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
     "not among the tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content",
     "may be null only"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
     400, "messages.0.content.0", "only text"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens",
     ("This model's maximum context length is 2048 tokens. However, you requested 5001 tokens "
      "(1 in the messages, 5000 in the completion). Please reduce the length of the messages or completion.")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages",
     "This model's maximum context length is 2048 tokens. However, you requested "),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist."),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 400, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "out of the vocabulary"),
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 4}', 400, "prompt", "lone surrogate (U+D800)"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}', 400, "messages",
     "the rendered conversation is not valid Unicode text"),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt", "lone surrogate"),
    ("/v1/completions", {"prompt": ["hi"] * 129, "max_tokens": 1}, 400, "prompt", "at most 128 prompts"),
    ("/v1/completions", {"prompt": "hi " * 400_000, "max_tokens": 1}, 400, "prompt",
     "more than that many tokens can hold"),
    ("/v1/nothing-here", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "needle"), ERROR_CASES,
                         ids=[f"{i}-{c[0]}-{c[2]}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input_gets_openai_error_body(http: httpx.Client, path: str, body, status: int, param, needle: str) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert error["param"] == param
    assert needle in error["message"], error["message"]


def test_vllm_wording_when_prompt_alone_is_too_long(http: httpx.Client) -> None:
    n = token_count(http, prompt=LONG_TEXT)
    r = http.post("/v1/completions", json={"prompt": LONG_TEXT, "max_tokens": None})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {n} tokens in the "
        "messages, Please reduce the length of the messages.")


def test_openai_client_raises_the_matching_errors(lserve_server: RemoteServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="greater than or equal to 1"):
        client.completions.create(model=MODEL_NAME, prompt="hi", n=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=100_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    wrong = openai.OpenAI(base_url=lserve_server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    for headers in ({}, {"Authorization": API_KEY}, {"Authorization": "Basic " + API_KEY}):
        r = httpx.post(lserve_server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"


def test_bad_requests_do_not_disturb_a_running_one(lserve_server: RemoteServer) -> None:
    async def main() -> tuple[str, list[int]]:
        async with httpx.AsyncClient(base_url=lserve_server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            good = asyncio.ensure_future(c.post("/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 16, "temperature": 0}))
            bad = [c.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
                   for path, body, *_ in ERROR_CASES]
            statuses = [r.status_code for r in await asyncio.gather(*bad)]
            return (await good).json()["choices"][0]["text"], statuses

    text, statuses = asyncio.run(main())
    assert all(400 <= s < 500 for s in statuses)
    alone = httpx.post(lserve_server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0}, timeout=120)
    assert text == alone.json()["choices"][0]["text"]


# ---- client disconnects -----------------------------------------------------------------------------


def _aborts(server: RemoteServer) -> float:
    return server.metrics()["vllm:request_success_total{abort}"]


def _assert_idle_and_alive(server: RemoteServer, http: httpx.Client, aborts_before: float) -> None:
    m = server.wait_idle(timeout=30)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["lserve:kv_cache_pages_used"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total{abort}"] == aborts_before + 1
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_disconnect_mid_stream_aborts_and_frees_pages(lserve_server: RemoteServer, http: httpx.Client) -> None:
    before = _aborts(lserve_server)
    body = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(received) >= 2
        m = lserve_server.metrics()
        assert m["vllm:num_requests_running"] == 1 and m["lserve:kv_cache_pages_used"] >= 1
    _assert_idle_and_alive(lserve_server, http, before)


def test_disconnect_before_first_token_aborts(lserve_server: RemoteServer, http: httpx.Client) -> None:
    before = _aborts(lserve_server)
    body = {"prompt": "hello world " * 300, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200  # headers only: the first token is not there yet
    _assert_idle_and_alive(lserve_server, http, before)


def test_non_streaming_client_that_gives_up_aborts(lserve_server: RemoteServer, http: httpx.Client) -> None:
    before = _aborts(lserve_server)
    log_start = len(lserve_server.log())
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1000, "ignore_eos": True},
                  timeout=1.5)
    _assert_idle_and_alive(lserve_server, http, before)
    log = lserve_server.log()[log_start:]
    assert "Traceback" not in log and "InvalidStateError" not in log, log  # a client leaving is no error
