"""Tool calling for chat completions: tools into the prompt, tool calls out of the output.

Models write tool calls in their family's own format; one `ToolCallFormat` per format renders
tools, earlier calls and tool results for a template without tool support, parses the calls out
of an output, and builds the grammar that forces one call (`tool_choice` "required" or a named
function):

- `hermes` (Qwen2.5/3, Hermes fine-tunes, and the fallback): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>` blocks, text around them being the message content;
- `llama3_json` (Llama 3.1-3.3): the whole message is a JSON object `{"name": ..., "parameters":
  {...}}`, optionally after `<|python_tag|>` (text before the tag is content), several separated by
  `;`;
- `mistral`: `[TOOL_CALLS]` and a JSON list `[{"name": ..., "arguments": {...}}]` (tokenizers up to
  v7), or `[TOOL_CALLS]name[ARGS]{...}` per call (v11 and later); text before the first
  `[TOOL_CALLS]` is content. Where `[TOOL_CALLS]` is a special token the request keeps special
  tokens in its text (as vLLM does) and a trailing end-of-sequence token is dropped before parsing.

`tool_call_format` picks the format from the `--tool-call-parser` flag, or with `auto` from the
model family (the registry's architecture name) and the tokenizer's vocabulary: the Llama
architecture also serves ChatML models such as the default SmolLM2, so only a Llama 3 vocabulary
(`<|python_tag|>`, `<|eot_id|>`) means `llama3_json`, and only a vocabulary with `[TOOL_CALLS]`
means `mistral`; everything else gets `hermes`.

A chat template that knows tools (it mentions `tools`) gets them from transformers'
`apply_chat_template(tools=...)`, and the messages as they are. A template that does not (the
default model's) gets the format's convention: the tools' JSON signatures and how to call them in
the system message, earlier calls rendered in the format, tool results in a user turn.

Parsing never fails: text that is not a well-formed call of a given function stays content (a
call naming an unknown function is dropped); malformed call text is returned as plain content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lserve.engine.tokenizer import render_chat

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""The forced call's JSON is written as the templates render it, with no free whitespace."""

TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")
"""The `--tool-call-parser` choices (vLLM's names); `auto` chooses by model family."""


@dataclass(frozen=True)
class ParsedCall:
    """One tool call found in an output."""

    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's format)."""


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (else the format's convention is used)."""
    return bool(template) and "tools" in str(template)


def _special_token_id(tokenizer: Any | None, text: str) -> int | None:
    """The id of `text` when it is one special (added, control) token of the tokenizer."""
    if tokenizer is None:
        return None
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "content", None) == text and getattr(added, "special", False):
            return int(token_id)
    return None


def _in_vocab(tokenizer: Any | None, text: str) -> bool:
    if tokenizer is None:
        return False
    try:
        return text in tokenizer.get_vocab()
    except (AttributeError, TypeError, NotImplementedError):
        return False


def _json_values(text: str, start: int, separator: str | None) -> tuple[list[Any], int] | None:
    """JSON values from `start` to the end of `text`, separated by `separator` (None: one value
    only), with whitespace around them; None when the text is anything else."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = _skip_space(text, start)
    while True:
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)
        pos = _skip_space(text, pos)
        if pos == len(text):
            return values, pos
        if separator is None or not text.startswith(separator, pos):
            return None
        pos = _skip_space(text, pos + len(separator))
        if pos == len(text):  # a trailing separator
            return values, pos


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _arguments_text(args: Any) -> str | None:
    """A call's arguments as OpenAI's JSON text: an object, or a JSON text of one; None otherwise."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else None


def _call_of(value: Any, keys: Sequence[str]) -> tuple[str, str] | None:
    """(name, arguments) of a JSON call object whose arguments are under one of `keys` (absent
    means no arguments); None when `value` is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = next((k for k in keys if k in value), None)
    args = _arguments_text(value[key] if key is not None else {})
    if args is None:
        return None
    return value["name"], args


def _calls_schema(functions: Sequence[dict[str, Any]], args_key: str) -> dict[str, Any]:
    """A JSON schema of one call object `{"name": ..., args_key: {...}}` of one of `functions`."""
    options = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        args_key: f.get("parameters") or {"type": "object"}},
        "required": ["name", args_key], "additionalProperties": False} for f in functions]
    return {"anyOf": options}


def _lark_json(schema: dict[str, Any]) -> str:
    """A Lark `%json` item (llguidance) for `schema`, in the templates' JSON style."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


class ToolCallFormat(ABC):
    """How one model family writes tool calls: prompt conventions, parsing, the forced-call grammar."""

    name: ClassVar[str]

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer

    # ---- prompts for templates without tool support -------------------------------------------

    @abstractmethod
    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """The system message text that describes `tools` and how to call them."""

    @abstractmethod
    def render_calls(self, calls: Sequence[dict[str, Any]]) -> str:
        """An assistant's earlier calls (`{"name", "arguments"}` with arguments as an object) as
        the model writes them."""

    def render_result(self, content: str) -> str:
        """A tool message's content as the user turn that carries it."""
        return f"<tool_response>\n{content}\n</tool_response>"

    def prompt_messages(self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages for a template without tool support: the tools (if any) in the system
        message, earlier calls and tool results as text in this format's convention."""
        out: list[dict[str, Any]] = []
        if tools:
            system = self.system_prompt(tools)
            if messages and messages[0]["role"] in ("system", "developer"):
                out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + system})
                messages = messages[1:]
            else:
                out.append({"role": "system", "content": system})
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = self.render_calls([c["function"] for c in m["tool_calls"]])
                out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", calls]))})
            elif m["role"] == "tool":
                out.append({"role": "user", "content": self.render_result(m["content"])})
            else:
                out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
        return out

    # ---- outputs ----------------------------------------------------------------------------

    @abstractmethod
    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
        """(the content, or None when only calls are left; the calls of functions in `names`).
        Text without well-formed calls comes back whole as the content, with no calls."""

    @abstractmethod
    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> str:
        """A Lark grammar (llguidance) for one call of one of `functions` (`name`, `parameters`)
        in this format, with arguments valid against the function's `parameters` schema."""

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether a request with tools must keep special tokens in its text (the format's
        markers are special tokens of this tokenizer)."""
        return False

    def call_id(self) -> str:
        """A fresh id for a parsed call (OpenAI's `call_...`)."""
        return f"call_{uuid.uuid4().hex[:24]}"


class HermesFormat(ToolCallFormat):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5 and Qwen3)."""

    name = "hermes"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    SYSTEM = (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}}\n</tool_call>"
    )

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        return self.SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))

    def render_calls(self, calls: Sequence[dict[str, Any]]) -> str:
        blocks = (json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) for c in calls)
        return "\n".join(f"<tool_call>\n{block}\n</tool_call>" for block in blocks)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
        calls = []
        for block in self.BLOCK.findall(text):
            try:
                value = json.loads(block)
            except json.JSONDecodeError:
                continue
            call = _call_of(value, ("arguments", "parameters"))
            if call is not None and call[0] in names:
                calls.append(ParsedCall(*call))
        if not calls:
            return text, []
        content = self.BLOCK.sub("", text).strip()
        return content or None, calls

    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> str:
        call = _lark_json(_calls_schema(functions, "arguments"))
        return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: ' + call


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.x's JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole message,
    optionally after `<|python_tag|>`, several separated by `;`."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    SYSTEM = (
        "You have access to the following functions:\n\n{tools}\n\n"
        "To call a function, reply with only a JSON object of the form "
        "{{\"name\": <function-name>, \"parameters\": <arguments-object>}}, with no other text; to call several, "
        "separate the objects with \"; \". Do not use variables. If no function fits, answer in plain text."
    )

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        return self.SYSTEM.format(tools="\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools))

    def render_calls(self, calls: Sequence[dict[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
                         for c in calls)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
        tag = text.find(self.PYTHON_TAG)
        if tag >= 0:
            content, start = text[:tag].strip() or None, tag + len(self.PYTHON_TAG)
        else:
            content, start = None, _skip_space(text, 0)
            if not text.startswith("{", start):
                return text, []
        found = _json_values(text, start, ";")
        if found is None:
            return text, []
        parsed = [_call_of(value, ("parameters", "arguments")) for value in found[0]]
        if any(call is None for call in parsed):
            return text, []
        calls = [ParsedCall(*call) for call in parsed if call is not None and call[0] in names]
        return (content, calls) if calls else (text, [])

    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> str:
        return "start: call\ncall: " + _lark_json(_calls_schema(functions, "parameters"))


class MistralFormat(ToolCallFormat):
    """Mistral's `[TOOL_CALLS]`: a JSON list of `{"name", "arguments"}` objects, or (tokenizers
    v11 and later, which have an `[ARGS]` token) `[TOOL_CALLS]name[ARGS]{...}` per call."""

    name = "mistral"
    MARK = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    CALL_ID = "[CALL_ID]"
    NAMED = re.compile(r"([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]*\s*)?\[ARGS\]")
    SYSTEM = (
        "You have access to the following functions:\n\n{tools}\n\n"
        "To call functions, reply with [TOOL_CALLS] followed by a JSON list of the calls: "
        "[TOOL_CALLS][{{\"name\": <function-name>, \"arguments\": <arguments-object>}}]. "
        "If no function fits, answer in plain text."
    )
    ID_CHARS = string.ascii_letters + string.digits

    def __init__(self, tokenizer: Any | None = None) -> None:
        super().__init__(tokenizer)
        self.mark_id = _special_token_id(tokenizer, self.MARK)
        self.args_id = _special_token_id(tokenizer, self.ARGS)
        special = getattr(tokenizer, "all_special_tokens", None) or []
        self._trailing = sorted((t for t in special if t not in (self.MARK, self.ARGS)), key=len, reverse=True)

    @property
    def keeps_special_tokens(self) -> bool:
        return self.mark_id is not None

    def call_id(self) -> str:
        """Nine letters and digits: Mistral's templates refuse other call ids."""
        return "".join(secrets.choice(self.ID_CHARS) for _ in range(9))

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        return self.SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))

    def render_calls(self, calls: Sequence[dict[str, Any]]) -> str:
        return self.MARK + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls],
                                      ensure_ascii=False)

    def render_result(self, content: str) -> str:
        return f"[TOOL_RESULTS]{content}[/TOOL_RESULTS]"

    def _strip_special_tail(self, text: str) -> str:
        """The text without special tokens at its end (the end-of-sequence token, which a request
        that keeps special tokens has in its text)."""
        stripped = True
        while stripped:
            stripped = False
            for token in self._trailing:
                if token and text.rstrip().endswith(token):
                    text, stripped = text.rstrip()[: -len(token)], True
        return text

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
        if self.keeps_special_tokens:
            text = self._strip_special_tail(text)
        first = text.find(self.MARK)
        if first < 0:
            return text, []
        content = text[:first].strip() or None
        found: list[tuple[str, str] | None] = []
        pos = first
        while pos < len(text):
            if text.startswith(self.MARK, pos):
                pos = _skip_space(text, pos + len(self.MARK))
            named = self.NAMED.match(text, pos)
            if named is not None:
                args = self._one_value(text, named.end())
                if args is None:
                    return text, []
                value, pos = args
                arguments = _arguments_text(value)
                found.append(None if arguments is None else (named.group(1), arguments))
            elif text.startswith(("[", "{"), pos):
                values = self._one_value(text, pos)
                if values is None:
                    return text, []
                value, pos = values
                items = value if isinstance(value, list) else [value]
                found += [_call_of(v, ("arguments", "parameters")) for v in items]
            else:
                return text, []
            pos = _skip_space(text, pos)
        if not found or any(call is None for call in found):
            return text, []
        calls = [ParsedCall(*call) for call in found if call is not None and call[0] in names]
        return (content, calls) if calls else (text, [])

    @staticmethod
    def _one_value(text: str, pos: int) -> tuple[Any, int] | None:
        try:
            return json.JSONDecoder().raw_decode(text, _skip_space(text, pos))
        except json.JSONDecodeError:
            return None

    def _marker(self, token_id: int | None, text: str) -> str:
        """A Lark item for a marker: its special token where the tokenizer has one, else its text."""
        return f"<[{token_id}]>" if token_id is not None else json.dumps(text)

    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> str:
        mark = self._marker(self.mark_id, self.MARK)
        if self.args_id is None:  # [TOOL_CALLS][{"name": ..., "arguments": {...}}]
            return f'start: {mark} "[" call "]"\ncall: ' + _lark_json(_calls_schema(functions, "arguments"))
        args = self._marker(self.args_id, self.ARGS)
        lines = ["start: " + mark + " call", "call: " + " | ".join(f"c{i}" for i in range(len(functions)))]
        for i, f in enumerate(functions):
            lines.append(f"c{i}: {json.dumps(f['name'])} {args} a{i}")
            lines.append(f"a{i}: " + _lark_json(f.get("parameters") or {"type": "object"}))
        return "\n".join(lines)


FORMATS: dict[str, type[ToolCallFormat]] = {f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat)}

FAMILY_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "LlamaForCausalLM": ("llama3_json", ("<|python_tag|>", "<|eot_id|>")),
    "MistralForCausalLM": ("mistral", ("[TOOL_CALLS]",)),
    "Qwen2ForCausalLM": ("hermes", ()),
    "Qwen3ForCausalLM": ("hermes", ()),
}
"""Per registered architecture: its family's format, and tokens one of which the vocabulary must
hold for it (an architecture also serves models with other chat formats); others get Hermes."""


def auto_format_name(architecture: str | None, tokenizer: Any | None) -> str:
    """The format `auto` picks for a model family and tokenizer."""
    name, markers = FAMILY_FORMATS.get(architecture or "", ("hermes", ()))
    if markers and not any(_in_vocab(tokenizer, m) for m in markers):
        return "hermes"
    return name


def tool_call_format(parser: str, architecture: str | None, tokenizer: Any | None) -> ToolCallFormat:
    """The format for `--tool-call-parser` (one of TOOL_CALL_PARSERS): named, or by family."""
    if parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; choose one of {', '.join(TOOL_CALL_PARSERS)}")
    name = auto_format_name(architecture, tokenizer) if parser == "auto" else parser
    return FORMATS[name](tokenizer)


def render_conversation(
    tokenizer: Any, fmt: ToolCallFormat, messages: list[dict[str, Any]], add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
) -> str:
    """The chat template's text of a conversation: tools and tool messages through the template
    when it knows them, else through `fmt`'s convention."""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not template_knows_tools(getattr(tokenizer, "chat_template", None)):
        messages, tools = fmt.prompt_messages(messages, tools or []), None
    return render_chat(tokenizer, messages, add_generation_prompt, tools or None)
