"""Structured outputs through llguidance: a grammar matcher per request, and one batched token
mask per step.

Each request with `structured_outputs` gets an `LLMatcher` over the model's vocabulary (JSON
schemas, any JSON object, regular expressions, choices and Lark/GBNF grammars are compiled by
llguidance). Before sampling, the matchers of a step's constrained rows fill one host bitmask (a
few microseconds each); it is copied to the device once and applied to the logits in place, so
there is no host sync per row. After a token arrives, its matcher consumes it; the engine stops
the request once the grammar is complete. The engine fills the bitmask (`grammar_bitmask`) and
sends it with the step; the runner applies it (`apply_bitmask`).

llguidance rather than xgrammar: it has no dependencies (one abi3 wheel), while xgrammar needs
apache-tvm-ffi and pins torch and triton. JSON is generated with fixed separators (", " and ": ")
and no free whitespace, as OpenAI's models write it: with flexible whitespace a sampled output can
fill its token budget with blanks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lserve.errors import RequestRejected
from lserve.sampling_params import StructuredOutputsParams


class InvalidGrammarError(RequestRejected, ValueError):
    """A schema, regular expression or grammar that cannot be compiled."""


class GrammarCompiler:
    """Builds a request's matcher; made once per engine from its tokenizer (a fraction of a second)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        self.vocab_size = vocab_size
        eos = sorted(eos_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=eos if len(eos) > 1 else eos[0])
        self._json = llguidance.JsonCompiler(separators=(", ", ": "), whitespace_flexible=False)

    def _grammar(self, p: StructuredOutputsParams) -> str:
        ll = self._llguidance
        if p.json_object or p.json is not None:
            schema = {"type": "object"} if p.json_object else p.json
            text = schema if isinstance(schema, str) else json.dumps(schema)
            kind, convert = "json", lambda: str(self._json.compile(text))
        elif p.regex is not None:
            kind, convert = "regex", lambda: str(ll.grammar_from("regex", p.regex))
        elif p.choice is not None:
            kind, convert = "choice", lambda: str(ll.grammar_from("choice", json.dumps(p.choice)))
        else:
            assert p.grammar is not None
            kind, convert = "grammar", lambda: str(ll.grammar_from("grammar", p.grammar))
        try:
            return convert()
        except (ValueError, TypeError) as exc:  # llguidance reports a malformed input as ValueError
            raise InvalidGrammarError(f"structured_outputs.{kind} cannot be used: {exc}"[:600]) from None

    def matcher(self, p: StructuredOutputsParams) -> Any:
        """A fresh matcher for one request; InvalidGrammarError naming the problem otherwise."""
        grammar = self._grammar(p)
        is_error, messages = self._llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise InvalidGrammarError(f"structured_outputs cannot be compiled: {' '.join(messages)[:500]}")
        m = self._llguidance.LLMatcher(self._tokenizer, grammar)
        if m.is_error():
            raise InvalidGrammarError(f"structured_outputs cannot be compiled: {m.get_error()[:500]}")
        return m


def grammar_bitmask(matchers: Sequence[Any | None], vocab_size: int) -> np.ndarray | None:
    """The allowed tokens of each row's matcher (None: unconstrained, every bit set) as one host
    bitmask (rows, ceil(vocab_size / 32)) int32; None when no row is constrained."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    import llguidance.torch as lt  # only here: an engine without structured outputs runs without llguidance
    mask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for i in rows:
        lt.fill_next_token_bitmask(matchers[i], mask, i)
    return mask.numpy()


def apply_bitmask(logits: torch.Tensor, bitmask: np.ndarray) -> None:
    """Mask the rows of logits (N, V) to their allowed tokens, in place: one copy, one masking call."""
    import llguidance.torch as lt

    mask = torch.from_numpy(bitmask)
    if logits.is_cuda:
        mask = mask.pin_memory().to(logits.device, non_blocking=True)
    lt.apply_token_bitmask_inplace(logits, mask)


def consume(matcher: Any, token: int) -> bool:
    """Advance a matcher by the sampled token; True when the grammar is complete (or broken)."""
    if not matcher.consume_token(token):
        return True
    return bool(matcher.is_stopped())
