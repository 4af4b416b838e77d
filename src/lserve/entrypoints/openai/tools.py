"""Tool calling for chat completions: tools into the prompt, tool calls out of the output.

A chat template that knows tools (it mentions `tools`) gets them from transformers'
`apply_chat_template(tools=...)`, and the messages as they are. A template that does not (the
default model's) gets the Hermes convention, which most open chat models are trained on: the
tools' JSON signatures in the system message inside `<tools></tools>`, calls written as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the assistant's earlier calls
rendered the same way and tool results as `<tool_response>` blocks in a user turn.

Output parsing takes every well-formed `<tool_call>` block naming a given function; the text
around the blocks stays the message content. `tool_choice="required"` or a named function
constrains the output with a grammar (structured outputs): one call block whose JSON follows the
function's `parameters` schema, so even a small model produces a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's format)."""


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in str(template)


def hermes_messages(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the tools (if any) in the system message,
    earlier calls and tool results as text in the Hermes convention."""
    out: list[dict[str, Any]] = []
    if tools:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] in ("system", "developer"):
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + system})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                      for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", *blocks]))})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def forced_call_grammar(functions: Sequence[dict[str, Any]]) -> str:
    """A Lark grammar (llguidance) for one `<tool_call>` block calling one of `functions` with
    arguments valid against its `parameters` schema."""
    options = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = {"anyOf": options, "x-guidance": JSON_STYLE}
    return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the call blocks or None, the calls) of an assistant output."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or data.get("name") not in names:
            continue
        args = data.get("arguments", data.get("parameters", {}))
        calls.append(ParsedCall(str(data["name"]), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
