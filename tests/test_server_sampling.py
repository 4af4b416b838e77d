"""The sampling controls through the server (openai client; vLLM's extras through extra_body)
give the offline engine's greedy outputs."""

from __future__ import annotations

import openai
import pytest

from lserve import LLM, SamplingParams
from tests.server_helpers import API_KEY, MODEL_NAME, RemoteServer

PROMPT = "Write a list of fruits: apples, pears,"


@pytest.fixture(scope="module")
def client(lserve_server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=lserve_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


CASES = [
    (dict(presence_penalty=0.7, frequency_penalty=1.5, logit_bias={"11": 3.0, "28": -5.0}), {},
     dict(presence_penalty=0.7, frequency_penalty=1.5, logit_bias={11: 3.0, 28: -5.0})),
    ({}, dict(allowed_token_ids=[260, 28, 30, 11]), dict(allowed_token_ids=[260, 28, 30, 11])),
    (dict(stop=[","]), dict(min_tokens=8, include_stop_str_in_output=True),
     dict(stop=[","], min_tokens=8, include_stop_str_in_output=True)),
]


@pytest.mark.parametrize(("openai_kw", "extra", "offline_kw"), CASES)
def test_controls_match_the_offline_engine(client: openai.OpenAI, default_llm: LLM, openai_kw: dict, extra: dict,
                                           offline_kw: dict) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body=extra, **openai_kw)
    want = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, **offline_kw),
                                use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason


def test_chat_takes_the_penalties(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "List five colors."}]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    penalized = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain.choices[0].message.content
