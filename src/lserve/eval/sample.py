"""Samples and how they are made to measure: prompt rendering, haystacks with needles, length fitting.

A sample's length is counted in the model's own tokens, on exactly the token ids the engine is
given (chat template included). Each task renders its prompt from a count `n` of haystack units
(words, or list entries) and `fit_sample` finds the largest `n` whose prompt fits the requested
length, so a sample lands a few tokens under its target at most.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One prompt with its exact references."""

    task: str
    """"passkey", "niah" or "ruler"."""
    subtask: str
    """The RULER subtask ("niah_single", "vt", ...); "" for passkey and niah."""
    length: int
    """Requested prompt length in the model's tokens."""
    depth: float | None
    """Requested needle depth in [0, 1] (passkey, niah); None where needles are spread at random."""
    index: int
    user_text: str
    """The user message (chat) or the bare prompt (no chat template)."""
    prompt_text: str
    """Exactly what the engine is given, as text (the chat template applied when chat is on)."""
    prompt_ids: list[int] = field(repr=False)
    answers: list[str]
    scorer: str
    """How the output is scored: "first_number" or "all_words" (see `lserve.eval.scoring`)."""
    max_tokens: int
    chat: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def sample_id(self) -> str:
        depth = "" if self.depth is None else f"@{self.depth:g}"
        sub = f"/{self.subtask}" if self.subtask else ""
        return f"{self.task}{sub}/{self.length}{depth}/{self.index}"


@dataclass(frozen=True)
class Template:
    """The fixed text around a task's context."""

    intro: str
    question: str
    answer_prefix: str = ""
    """Ends prompts rendered without a chat template ("The pass key is"), so a base model completes it."""


class PromptFormat:
    """Turns a task's text into the prompt the model sees: chat template or plain text (`chat`
    None: the chat template when the tokenizer has one, as an instruct model's does; plain text
    for a base model)."""

    def __init__(self, tokenizer: Any, chat: bool | None = None) -> None:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; lserve eval needs one to build and count prompts")
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; pass --no-chat")
        self.tokenizer = tokenizer
        self.chat = chat

    def render(self, template: Template, context: str) -> tuple[str, str]:
        """(user text, full prompt text) for a context."""
        user = f"{template.intro}{context}{template.question}"
        if self.chat:
            messages = [{"role": "user", "content": user}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return user, str(text)
        prompt = f"{user} {template.answer_prefix}" if template.answer_prefix else user
        return user, prompt

    def encode(self, prompt_text: str) -> list[int]:
        """Token ids as the engine gets them: chat text carries its special tokens already."""
        return list(self.tokenizer.encode(prompt_text, add_special_tokens=not self.chat))

    def count(self, text: str) -> int:
        """Tokens of a piece of text on its own (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class Needle:
    depth: float
    """Where the needle goes, as a fraction of the haystack (0 = start, 1 = end)."""
    text: str


class Haystack:
    """A lazily drawn stream of sentences, cut to any number of words, with needles at sentence starts."""

    def __init__(self, sentences: Iterator[str]) -> None:
        self._source = sentences
        self.words: list[str] = []
        self.starts: list[int] = []
        """Word index where each sentence begins."""

    def _ensure(self, num_words: int) -> None:
        while len(self.words) < num_words:
            sentence = next(self._source).split()
            if sentence:
                self.starts.append(len(self.words))
                self.words.extend(sentence)

    def boundary(self, num_words: int, depth: float) -> int:
        """The sentence start (or the end) closest to `depth` of the first `num_words` words."""
        self._ensure(num_words)
        target = depth * num_words
        cut = bisect.bisect_right(self.starts, num_words - 1)
        candidates = self.starts[:cut] + [num_words]
        i = bisect.bisect_left(candidates, target)
        near = candidates[max(0, i - 1): i + 1]
        return min(near, key=lambda c: (abs(c - target), c))

    def text(self, num_words: int, needles: Sequence[Needle] = ()) -> str:
        """The first `num_words` words with each needle inserted at its depth (stable for equal depths)."""
        self._ensure(num_words)
        placed = sorted(((self.boundary(num_words, n.depth), i, n.text) for i, n in enumerate(needles)))
        parts: list[str] = []
        prev = 0
        for pos, _, needle in placed:
            if pos > prev:
                parts.append(" ".join(self.words[prev:pos]))
            parts.append(needle)
            prev = pos
        if num_words > prev:
            parts.append(" ".join(self.words[prev:num_words]))
        return " ".join(parts)


class LengthError(ValueError):
    """A requested length the task cannot be made to fit."""


def fit_count(tokens_for: Callable[[int], int], target: int, probe: int = 64, what: str = "prompt") -> int:
    """The largest n >= 0 with tokens_for(n) <= target; tokens_for grows (nearly) linearly with n.

    Secant steps from a probe, then bisection inside the bracket: about five evaluations for
    any target length.
    """
    t0 = tokens_for(0)
    if t0 > target:
        raise LengthError(f"length {target} is too short for the {what}: its fixed text alone has {t0} tokens")
    lo, t_lo = 0, t0
    hi: int | None = None
    t_hi = 0
    guess = max(1, probe)
    for step in range(80):
        t = tokens_for(guess)
        if t <= target:
            lo, t_lo = guess, t
        else:
            hi, t_hi = guess, t
        if hi is not None and hi - lo <= 1:
            return lo
        if hi is None:
            slope = (t_lo - t0) / lo if lo > 0 else 0.0
            guess = lo + max(1, int((target - t_lo) / slope)) if slope > 0 else max(2 * lo, lo + 1)
            continue
        slope = (t_hi - t_lo) / (hi - lo)
        secant = lo + int((target - t_lo) / slope) if slope > 0 and step < 12 else (lo + hi) // 2
        guess = min(max(secant, lo + 1), hi - 1)
    return lo


@dataclass(frozen=True)
class Fitted:
    count: int
    user_text: str
    prompt_text: str
    prompt_ids: list[int]


def fit_prompt(
    fmt: PromptFormat, template: Template, context_for: Callable[[int], str], target: int, what: str
) -> Fitted:
    """Render the prompt with the most context units whose token count stays within `target`."""
    cache: dict[int, tuple[str, str, list[int]]] = {}

    def tokens_for(n: int) -> int:
        if n not in cache:
            user, prompt = fmt.render(template, context_for(n))
            cache[n] = (user, prompt, fmt.encode(prompt))
        return len(cache[n][2])

    n = fit_count(tokens_for, target, what=what)
    tokens_for(n)
    user, prompt, ids = cache[n]
    return Fitted(n, user, prompt, ids)
