"""Log-probabilities in OpenAI's response formats, from the engine's per-position entries.

An entry (`lserve.request.TokenLogprobs`) maps token ids to `Logprob(logprob, rank,
decoded_token)`: the chosen token first, then the k most likely (vLLM's order). Completions use
the legacy format (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; with echo the
prompt's tokens come first, the very first one without a log-probability), chat the
`content` list of `{token, logprob, bytes, top_logprobs}`. JSON has no -inf: values are floored
at -9999 as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lserve.request import Logprob, TokenLogprobs

LOGPROB_FLOOR = -9999.0


def _value(lp: Logprob) -> float:
    return max(lp.logprob, LOGPROB_FLOOR)


def _top(entry: TokenLogprobs, k: int) -> list[Logprob]:
    """The k most likely tokens of a position, most likely first."""
    ranked = sorted((v for v in entry.values() if v.rank is not None and v.rank <= k), key=lambda v: v.rank or 0)
    return ranked[:k]


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], k: int,
                        offset: int, first_text: str = "") -> dict[str, Any]:
    """The legacy format for tokens with their entries (None: the prompt's first token, whose
    text is `first_text`); `offset` is the character offset of the first token in the text.
    `top_logprobs` holds the chosen token and the k most likely, as vLLM returns them."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token, entry in zip(token_ids, entries):
        if entry is None:
            text = first_text
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            chosen = entry[token]
            text = chosen.decoded_token or ""
            token_logprobs.append(_value(chosen))
            top = {text: _value(chosen)}
            for lp in _top(entry, k):
                top.setdefault(lp.decoded_token or "", _value(lp))
            top_logprobs.append(top)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def merge_completion_logprobs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several legacy-format blocks (prompt, then output) as one."""
    return {key: [x for part in parts for x in part[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                        "text_offset")}


def _chat_token(lp: Logprob) -> dict[str, Any]:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": _value(lp), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs], k: int) -> list[dict[str, Any]]:
    """Chat's `content` list: each output token and its k most likely alternatives."""
    return [{**_chat_token(entry[token]), "top_logprobs": [_chat_token(lp) for lp in _top(entry, k)]}
            for token, entry in zip(token_ids, entries)]


def prompt_logprobs_by_id(entries: Sequence[TokenLogprobs | None]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` field: per prompt token, its entry keyed by token id."""
    return [None if entry is None else {str(t): {"logprob": _value(lp), "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in entries]
