"""Structured outputs (llguidance): sampled outputs always follow the JSON schema, regular
expression, choice or grammar; unconstrained rows of the same batch are untouched; bad schemas
and grammars are clear errors; and through the server, 100 sampled JSON-schema requests all
parse and validate."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from lserve import LLM, SamplingParams, StructuredOutputsParams
from lserve.runner.structured import InvalidGrammarError
from tests.server_helpers import API_KEY, MODEL_NAME, RemoteServer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colors"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person as JSON with a name, an age and favourite colors."}]


def _sampled(llm: LLM, so: StructuredOutputsParams, n: int, max_tokens: int = 80) -> list[str]:
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=so) for i in range(n)]
    outs = llm.chat([CHAT] * n, params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_json_schema_and_json_object(default_llm: LLM) -> None:
    for text in _sampled(default_llm, StructuredOutputsParams(json=SCHEMA), 8):
        jsonschema.validate(json.loads(text), SCHEMA)
    for text in _sampled(default_llm, StructuredOutputsParams(json=json.dumps(SCHEMA)), 2):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_and_grammar(default_llm: LLM) -> None:
    for text in _sampled(default_llm, StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}"), 4):
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text
    for text in _sampled(default_llm, StructuredOutputsParams(choice=["yes", "no", "maybe"]), 4):
        assert text in ("yes", "no", "maybe")
    grammar = 'start: "(" item ("," item)? ("," item)? ")"\nitem: /[a-z]{1,5}/'
    for text in _sampled(default_llm, StructuredOutputsParams(grammar=grammar), 4, max_tokens=40):
        assert re.fullmatch(r"\([a-z]{1,5}(,[a-z]{1,5}){0,2}\)", text), text


def test_constrained_and_free_rows_share_a_batch(default_llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=10)
    alone = default_llm.chat(CHAT, free, use_tqdm=False)[0].outputs[0].text
    mixed = default_llm.chat([CHAT, CHAT], [SamplingParams(temperature=0, max_tokens=40, structured_outputs=
                                                           StructuredOutputsParams(choice=["ok"])), free],
                             use_tqdm=False)
    assert mixed[0].outputs[0].text == "ok" and mixed[0].outputs[0].finish_reason == "stop"
    assert mixed[1].outputs[0].text == alone


@pytest.mark.parametrize("so", [dict(regex="[a-z"), dict(json={"type": "nonsense"}), dict(json="{not json"),
                                dict(grammar="start: (")])
def test_bad_constraints_are_clear_errors(default_llm: LLM, so: dict) -> None:
    with pytest.raises(InvalidGrammarError, match="structured_outputs"):
        default_llm.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(**so)), use_tqdm=False)


@pytest.mark.parametrize("kwargs", [{}, dict(regex="a", choice=["a"]), dict(choice=[]), dict(regex="")])
def test_params_need_exactly_one_constraint(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_server_json_schema_100_sampled_requests_validate(lserve_server: RemoteServer) -> None:
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 80, "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=lserve_server.url, timeout=300,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json={**body, "seed": i})
                                          for i in range(100)))

    for r in asyncio.run(main()):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_choice": ["left", "right"]}, lambda t, f: t in ("left", "right")),
    ({"guided_regex": "[A-Z][a-z]{2,6}"}, lambda t, f: re.fullmatch("[A-Z][a-z]{2,6}", t)),
    # any JSON object may run past max_tokens: a finished one parses, a cut one is a JSON object's start
    ({"response_format": {"type": "json_object"}},
     lambda t, f: isinstance(json.loads(t), dict) if f == "stop" else t.startswith("{")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t, f: t in ("up", "down")),
])
def test_server_constraints_in_completions_and_chat(lserve_server: RemoteServer, extra: dict, check) -> None:
    with httpx.Client(base_url=lserve_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        chat = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 60, "temperature": 1.0,
                                                    "seed": 1, **extra})
        comp = c.post("/v1/completions", json={"prompt": "Answer:", "max_tokens": 60, "temperature": 1.0,
                                               "seed": 2, **extra})
    chat_choice, comp_choice = chat.json()["choices"][0], comp.json()["choices"][0]
    assert check(chat_choice["message"]["content"], chat_choice["finish_reason"]), chat.text
    assert check(comp_choice["text"], comp_choice["finish_reason"]), comp.text


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"guided_regex": "[a-z"}, "guided_regex", "cannot be compiled"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give one output constraint"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs its json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "Input should be"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json", "json cannot be used"),
    ({"guided_grammar": "8"}, "guided_grammar", "grammar cannot be used"),  # found by the fuzz test
    ({"guided_grammar": ""}, "guided_grammar", "non-empty"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs", "cannot be"),
])
def test_server_bad_constraints_are_400(lserve_server: RemoteServer, extra: dict, param: str, needle: str) -> None:
    r = httpx.post(lserve_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"messages": CHAT, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error
