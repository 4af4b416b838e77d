"""n and best_of through the server (openai client): n choices that each equal a single request
with seed + i, computed from one prefill of the prompt; streamed chat choices equal the
non-streamed ones; best_of returns the choice with the highest cumulative log-probability."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.server_helpers import API_KEY, MODEL_NAME, RemoteServer

PROMPT = "Once upon a time, in a small village by the sea, there lived"
CHAT = [{"role": "user", "content": "Tell me a one-line story about a cat."}]


@pytest.fixture(scope="module")
def client(lserve_server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=lserve_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _iteration_tokens(server: RemoteServer) -> float:
    """The sum of the tokens every engine step computed so far (the server's own metric)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(re.search(r"^vllm:iteration_tokens_total_sum\S* (\S+)$", text, re.M).group(1))


def test_completion_choices_equal_single_runs_and_share_the_prompt(lserve_server: RemoteServer,
                                                                   client: openai.OpenAI) -> None:
    n, max_tokens = 4, 8
    prompt_len = len(httpx.post(lserve_server.url + "/tokenize", json={"prompt": PROMPT},
                                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()["tokens"])
    before = _iteration_tokens(lserve_server)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=n, max_tokens=max_tokens, temperature=1.0,
                                  seed=21, extra_body={"ignore_eos": True})
    computed = _iteration_tokens(lserve_server) - before
    assert [c.index for c in r.choices] == list(range(n))
    # the prompt but its last token once, then each choice its last prompt token and its decodes
    assert computed == prompt_len - 1 + n * max_tokens
    assert r.usage.prompt_tokens == prompt_len and r.usage.completion_tokens == n * max_tokens
    singles = [client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=1.0,
                                         seed=21 + i, extra_body={"ignore_eos": True}).choices[0].text
               for i in range(n)]
    assert [c.text for c in r.choices] == singles
    assert len(set(singles)) == n


def test_streamed_chat_choices_equal_the_whole_ones(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, messages=CHAT, n=3, max_tokens=12, temperature=1.0, seed=4)
    whole = client.chat.completions.create(**kw)
    texts = ["", "", ""]
    finish = [None, None, None]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]


def test_best_of_returns_the_most_likely_choice(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0)
    best = client.completions.create(best_of=3, n=1, seed=8, **kw)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None  # not asked for, not returned
    runs = [client.completions.create(seed=8 + i, logprobs=0, **kw).choices[0] for i in range(3)]
    scores = [sum(run.logprobs.token_logprobs) for run in runs]
    assert best.choices[0].text == runs[max(range(3), key=lambda i: scores[i])].text
    assert best.usage.completion_tokens == sum(len(run.logprobs.tokens) for run in runs)
