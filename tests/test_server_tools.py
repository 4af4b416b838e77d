"""Tool calling with the official openai client on the default model (its template has no tool
support, so tools go through the Hermes convention): a required or named call is a valid call
(constrained by a grammar), the round trip call -> tool result -> answer works, streaming carries
the calls, and the parser keeps only well-formed calls of given functions."""

from __future__ import annotations

import json

import openai
import pytest

from lserve.entrypoints.openai.tools import forced_call_grammar, hermes_messages, parse_tool_calls
from tests.server_helpers import API_KEY, MODEL_NAME, RemoteServer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(lserve_server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=lserve_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_call_is_a_valid_call(client: openai.OpenAI, choice) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       max_tokens=60, temperature=1.0, seed=3)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    args = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "add" and isinstance(args["a"], int) and isinstance(args["b"], int)
    else:
        assert call.function.name in ("get_weather", "add") and set(args) in ({"city"}, {"a", "b"})


def test_round_trip_call_tool_result_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, max_tokens=40, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})}]
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=40,
                                            temperature=0)
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_round_trip_prompt_holds_the_call_and_the_result(lserve_server: RemoteServer) -> None:
    import httpx

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"}]
    with httpx.Client(base_url=lserve_server.url, timeout=60) as c:
        ids = c.post("/tokenize", json={"messages": messages}).json()["tokens"]
        text = c.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, cloudy\n</tool_response>" in text


def test_streamed_forced_call(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                                 max_tokens=60, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_tools_out(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content and not r.choices[0].message.tool_calls


def test_parser_and_prompt_helpers() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{broken</tool_call>'
    content, calls = parse_tool_calls(text, {"add", "get_weather"})
    assert [c.name for c in calls] == ["add"] and json.loads(calls[0].arguments) == {"a": 1, "b": 2}
    assert content == "Sure."
    assert parse_tool_calls("no calls here", {"add"}) == ("no calls here", [])
    rendered = hermes_messages([{"role": "system", "content": "Be brief."}, *ASK], [t for t in TOOLS])
    assert rendered[0]["content"].startswith("Be brief.") and "<tools>" in rendered[0]["content"]
    assert '"name": "get_weather"' in rendered[0]["content"] and rendered[1] == ASK[0]
    assert "%json" in forced_call_grammar([TOOLS[1]["function"]])
