"""Tool calling with the official openai client on the default model (its template has no tool
support, so tools go through the format's convention; Hermes by default, and Llama 3's JSON and
Mistral's [TOOL_CALLS] by `--tool-call-parser`): a required or named call is a valid call
(constrained by a grammar), the round trip call -> tool result -> answer works, streaming carries
the calls. Each format's parser keeps only well-formed calls of given functions (malformed text
is plain content), its forced-call grammar accepts exactly its own format, and a chat template
that renders tools itself (Llama 3.1 style) gets them and gives calls that parse back."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import httpx
import openai
import pytest

from lserve.entrypoints.openai.tools import (
    FAMILY_FORMATS,
    HermesFormat,
    Llama3JsonFormat,
    MistralFormat,
    ParsedCall,
    ToolCallFormat,
    auto_format_name,
    render_conversation,
    tool_call_format,
)
from lserve.model.registry import REGISTRY
from lserve.runner.structured import GrammarCompiler
from lserve.sampling_params import StructuredOutputsParams
from tests.server_helpers import API_KEY, DEFAULT_ARGS, MODEL_NAME, RemoteServer

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



# ---- the parsers -----------------------------------------------------------------------------

NAMES = {"add", "get_weather"}
ADD = ParsedCall("add", '{"a": 1, "b": 2}')
WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')

WELL_FORMED = [  # (format, output text, content, calls)
    (HermesFormat, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None, [ADD]),
    (HermesFormat, 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                   '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "Sure.",
     [ADD, WEATHER]),
    (Llama3JsonFormat, '{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [ADD]),
    (Llama3JsonFormat, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [ADD]),
    (Llama3JsonFormat, '  {"name": "add", "parameters": {"a": 1, "b": 2}}; '
                       '{"name": "get_weather", "arguments": {"city": "Paris"}};', None, [ADD, WEATHER]),
    (Llama3JsonFormat, 'Let me look. <|python_tag|>{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}',
     "Let me look.", [WEATHER]),
    (MistralFormat, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, [ADD]),
    (MistralFormat, 'On it. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                    '{"name": "get_weather", "arguments": {"city": "Paris"}}]', "On it.", [ADD, WEATHER]),
    (MistralFormat, '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', None, [ADD]),
    (MistralFormat, '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None,
     [ADD, WEATHER]),
    (MistralFormat, '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}', None, [WEATHER]),
]

MALFORMED = [  # each comes back whole as plain content, with no calls
    (HermesFormat, '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>'),
    (HermesFormat, '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'),
    (HermesFormat, '<tool_call>["add", {"a": 1}]</tool_call>'),
    (HermesFormat, "no calls here"),
    (Llama3JsonFormat, '{"name": "add", "parameters": {"a": 1'),
    (Llama3JsonFormat, '{"name": "add", "parameters": {"a": 1}} and then some text'),
    (Llama3JsonFormat, 'The call would be {"name": "add", "parameters": {"a": 1}}'),  # not at the start, no tag
    (Llama3JsonFormat, '{"name": "add", "parameters": [1, 2]}'),
    (Llama3JsonFormat, '{"name": "nope", "parameters": {}}'),
    (Llama3JsonFormat, '{"answer": 42}'),
    (Llama3JsonFormat, '{"name": "add", "parameters": {}} {"name": "add", "parameters": {}}'),  # no separator
    (MistralFormat, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}'),
    (MistralFormat, '[TOOL_CALLS]add[ARGS]{"a": 1'),
    (MistralFormat, '[TOOL_CALLS]add[ARGS]{"a": 1} and more'),
    (MistralFormat, '[TOOL_CALLS]add{"a": 1}'),
    (MistralFormat, '[TOOL_CALLS]'),
    (MistralFormat, '[TOOL_CALLS][{"name": "nope", "arguments": {}}]'),
    (MistralFormat, "just an answer"),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), WELL_FORMED)
def test_parser_finds_the_calls(fmt: type[ToolCallFormat], text: str, content: str | None,
                                calls: list[ParsedCall]) -> None:
    assert fmt().parse(text, NAMES) == (content, calls)


@pytest.mark.parametrize(("fmt", "text"), MALFORMED)
def test_malformed_calls_are_plain_content(fmt: type[ToolCallFormat], text: str) -> None:
    assert fmt().parse(text, NAMES) == (text, [])


def test_a_call_of_an_unknown_function_is_dropped_beside_good_ones() -> None:
    text = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "rm_rf", "parameters": {}}'
    assert Llama3JsonFormat().parse(text, NAMES) == (None, [ADD])
    text = '[TOOL_CALLS][{"name": "rm_rf", "arguments": {}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert MistralFormat().parse(text, NAMES) == (None, [ADD])


def test_prompt_conventions_without_a_tool_template() -> None:
    functions = [t["function"] for t in TOOLS]
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    for fmt in (HermesFormat(), Llama3JsonFormat(), MistralFormat()):
        rendered = fmt.prompt_messages(history, TOOLS)
        assert rendered[0]["content"].startswith("Be brief.\n\n") and rendered[1] == ASK[0]
        assert all(f'"name": "{f["name"]}"' in rendered[0]["content"] for f in functions)
        assert rendered[2]["role"] == "assistant" and rendered[3]["role"] == "user" and "18 C" in rendered[3]["content"]
        # the model's earlier call is written in the format, so it parses back
        assert fmt.parse(rendered[2]["content"], NAMES) == (None, [WEATHER])
    assert "<tools>" in HermesFormat().prompt_messages(ASK, TOOLS)[0]["content"]
    assert '"parameters"' in Llama3JsonFormat().system_prompt(TOOLS)
    assert "[TOOL_CALLS]" in MistralFormat().system_prompt(TOOLS)


# ---- forced calls: each format's grammar accepts exactly its own format ------------------------


def _matcher_accepts(compiler: GrammarCompiler, grammar: str, ids: list[int]) -> bool:
    m = compiler.matcher(StructuredOutputsParams(grammar=grammar))
    return all(m.consume_token(t) for t in ids) and m.is_accepting()


@pytest.fixture(scope="module")
def mistral_tokenizer(tokenizer):
    """The default tokenizer with Mistral's control tokens added as special tokens."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    return tok


@pytest.mark.parametrize("fmt", [HermesFormat, Llama3JsonFormat, MistralFormat])
def test_forced_grammar_accepts_its_format_only(tokenizer, fmt: type[ToolCallFormat]) -> None:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    grammar = fmt(tokenizer).forced_grammar([t["function"] for t in TOOLS])
    texts = {HermesFormat: '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
             Llama3JsonFormat: '{"name": "add", "parameters": {"a": 1, "b": 2}}',
             MistralFormat: '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'}
    for other, text in texts.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert _matcher_accepts(compiler, grammar, ids) == (other is fmt), (fmt.name, text)
    wrong_args = texts[fmt].replace('"b": 2', '"b": "two"')
    assert not _matcher_accepts(compiler, grammar, tokenizer.encode(wrong_args, add_special_tokens=False))
    assert fmt().parse(texts[fmt], NAMES) == (None, [ADD])


def test_mistral_control_tokens(mistral_tokenizer) -> None:
    """With [TOOL_CALLS] and [ARGS] special tokens (tokenizers v11+): the forced call uses them,
    the request keeps special tokens so the text shows them, and the end-of-sequence token is
    dropped before parsing."""
    tok = mistral_tokenizer
    fmt = MistralFormat(tok)
    mark, args = tok.convert_tokens_to_ids("[TOOL_CALLS]"), tok.convert_tokens_to_ids("[ARGS]")
    assert fmt.keeps_special_tokens and (fmt.mark_id, fmt.args_id) == (mark, args)
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    grammar = fmt.forced_grammar([t["function"] for t in TOOLS])
    ids = [mark, *tok.encode("add", add_special_tokens=False), args,
           *tok.encode('{"a": 1, "b": 2}', add_special_tokens=False)]
    assert _matcher_accepts(compiler, grammar, ids)
    spelled = tok.encode('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', add_special_tokens=False, split_special_tokens=True)
    assert spelled != ids and not _matcher_accepts(compiler, grammar, spelled)  # the text alone is not the call
    text = tok.decode([*ids, tok.eos_token_id], skip_special_tokens=False)
    assert text.endswith(tok.eos_token) and fmt.parse(text, NAMES) == (None, [ADD])
    assert fmt.parse("Hello." + tok.eos_token, NAMES) == ("Hello.", [])
    assert re.fullmatch(r"[A-Za-z0-9]{9}", fmt.call_id())  # Mistral's templates take no other ids


def test_auto_chooses_by_family_and_vocabulary(tokenizer, mistral_tokenizer) -> None:
    assert set(FAMILY_FORMATS) <= set(REGISTRY)  # every family named is a registered architecture
    llama3 = copy.deepcopy(tokenizer)
    llama3.add_special_tokens({"additional_special_tokens": ["<|python_tag|>", "<|eot_id|>"]})
    assert auto_format_name("LlamaForCausalLM", tokenizer) == "hermes"  # SmolLM2: a ChatML Llama
    assert auto_format_name("LlamaForCausalLM", llama3) == "llama3_json"
    assert auto_format_name("MistralForCausalLM", mistral_tokenizer) == "mistral"
    assert auto_format_name("MistralForCausalLM", tokenizer) == "hermes"  # a Hermes fine-tune of Mistral
    assert auto_format_name("Qwen2ForCausalLM", tokenizer) == auto_format_name("Qwen3ForCausalLM", None) == "hermes"
    assert auto_format_name("Gemma3ForCausalLM", tokenizer) == auto_format_name(None, None) == "hermes"
    assert isinstance(tool_call_format("mistral", "LlamaForCausalLM", tokenizer), MistralFormat)
    assert isinstance(tool_call_format("auto", "LlamaForCausalLM", llama3), Llama3JsonFormat)
    with pytest.raises(ValueError, match="unknown tool-call parser 'pythonic'"):
        tool_call_format("pythonic", None, None)


# ---- a chat template that renders tools itself -----------------------------------------------

# modelled on Llama 3.1's tool section: the tools as JSON in a system turn, calls written as
# {"name": ..., "parameters": ...}, tool results in an `ipython` turn
LLAMA31_STYLE_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    'Answer a function call as JSON in the format {"name": function name, "parameters": dictionary of argument '
    'name and its value}. Do not use variables.\n\n'
    "{% for t in tools %}{{ t | tojson }}\n\n{% endfor -%}"
    "<|eot_id|>"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for c in m.tool_calls -%}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{%- if not loop.last %}; {% endif -%}"
    "{%- endfor -%}"
    "<|eot_id|>"
    "{%- elif m.role == 'tool' -%}"
    "<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- else -%}"
    "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif -%}"
)


def test_native_tool_template_gets_the_tools_and_its_calls_parse_back(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]})
    tok.chat_template = LLAMA31_STYLE_TEMPLATE
    fmt = tool_call_format("auto", "LlamaForCausalLM", tok)  # a Llama 3 vocabulary: its JSON calls
    assert isinstance(fmt, Llama3JsonFormat)
    prompt = render_conversation(tok, fmt, list(ASK), True, TOOLS)
    assert "Environment: ipython" in prompt and "<tools>" not in prompt  # the template's own tool section
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "What is the weather in Paris?" in prompt
    # round trip: the calls as the template writes them (the model's trained format) parse back
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"}]
    rendered = render_conversation(tok, fmt, history, True, TOOLS)
    written = re.search(r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", rendered).group(1)
    assert fmt.parse(written, NAMES) == (None, [WEATHER, ADD])
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, cloudy<|eot_id|>" in rendered
    # and what the tokenizer makes of it decodes to the same text (the template's markers are tokens)
    assert tok.decode(tok.encode(rendered, add_special_tokens=False)) == rendered


# ---- the other formats through the server (--tool-call-parser) ---------------------------------


@pytest.fixture(scope="module", params=["llama3_json", "mistral"])
def format_server(request: pytest.FixtureRequest) -> Any:
    server = RemoteServer(*DEFAULT_ARGS, "--tool-call-parser", request.param)
    yield request.param, server
    server.stop()


def test_forced_calls_in_the_chosen_format(format_server: Any) -> None:
    name, server = format_server
    assert f"tool calls: {name} format" in server.log()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, temperature=1.0, seed=5)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    args = json.loads(msg.tool_calls[0].function.arguments)
    assert msg.tool_calls[0].function.name in ("get_weather", "add") and set(args) in ({"city"}, {"a", "b"})
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=60, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add"
    assert set(json.loads(calls[0].function.arguments)) == {"a", "b"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the prompt in the format's convention; the answer follows
    call = msg.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 C, cloudy"}]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        ids = c.post("/tokenize", json={"messages": history}).json()["tokens"]
        text = c.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    written = {"llama3_json": json.dumps({"name": call.function.name, "parameters": args}),
               "mistral": "[TOOL_CALLS]" + json.dumps([{"name": call.function.name, "arguments": args}])}[name]
    assert written in text and "18 C, cloudy" in text
    answer = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=20,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
