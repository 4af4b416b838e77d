"""SamplingParams: how to pick each next token and when to stop (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
"""The most top log-probabilities a request may ask for, per token (vLLM's default `max_logprobs`)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's `StructuredOutputsParams`); exactly one of:
    `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings) or `grammar` (Lark or GBNF)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (a dict or its text)")


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request.

    temperature 0 is greedy decoding. `stop` strings end generation and are not included in the
    returned text; `stop_token_ids` end it and are included in `token_ids` (the EOS token too).
    `logprobs` = k returns, per generated token, its log-probability and the k most likely
    tokens' (0: the token's alone); `prompt_logprobs` = k the same for every prompt token after
    the first. Log-probabilities are those of the model's raw distribution (log_softmax of the
    logits, before temperature, penalties and filtering: vLLM's default).

    `presence_penalty` and `frequency_penalty` (OpenAI's) lower the logits of tokens already
    generated, once and per occurrence; `repetition_penalty` (CTRL's) divides those of every
    token seen, prompt included. `logit_bias` adds to chosen tokens' logits, `allowed_token_ids`
    keeps only those tokens, `min_tokens` keeps EOS, `stop_token_ids` and stop strings from ending
    the output before that many tokens, `include_stop_str_in_output` keeps the stop string in the
    text. `structured_outputs` constrains the output to a JSON schema, a regular expression, a
    choice of strings or a grammar. `n` samples several sequences for one prompt, sharing its
    KV. Invalid values raise ValueError naming the field and its allowed range.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    n: int = 1
    """Sequences to sample for the prompt; they share the prompt's KV pages (computed once), and
    with a `seed` sequence i draws from seed + i."""
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self._check_range("temperature", self.temperature, 0.0, None)
        self._check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self._check_range("min_p", self.min_p, 0.0, 1.0)
        self._check_range("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids
        self._check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self._check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(t) and t >= 0 and _is_number(b) and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
                raise ValueError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias!r}")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or not all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0, got {self.allowed_token_ids!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {k!r}")

    @staticmethod
    def _check_range(
        name: str, value: object, low: float, high: float | None, *, low_open: bool = False
    ) -> None:
        ok = _is_number(value)
        if ok:
            v = float(value)  # type: ignore[arg-type]
            ok = (v > low if low_open else v >= low) and (high is None or v <= high)
        if not ok:
            bracket = "(" if low_open else "["
            upper = f"{high}]" if high is not None else "inf)"
            raise ValueError(f"{name} must be in {bracket}{low}, {upper}, got {value!r}")

    @property
    def penalizes_output(self) -> bool:
        """Whether sampling reads the values of the tokens generated so far (penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_row_context(self) -> bool:
        """Whether the sampler needs more than the logits for this request."""
        return self.penalizes_output or bool(self.logit_bias) or self.allowed_token_ids is not None \
            or self.min_tokens > 0

    @property
    def is_greedy(self) -> bool:
        # below 1e-5 dividing the logits overflows; such temperatures mean greedy (as in vLLM)
        return self.temperature < 1e-5
