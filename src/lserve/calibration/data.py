"""Synthetic multi-passkey samples for calibration (DuoAttention's retrieval task, made here).

A sample is a haystack of filler sentences with `num_passkeys` needles at sorted depths, then a
question, then the answer: every passkey, in order. Each passkey is a run of NATO-alphabet words.
The loss looks at the hidden states that predict the passkey words of the answer: producing them
needs the needles, far back in the context, which is exactly what streaming heads cannot see.

Samples are built as token ids piece by piece (each sentence, needle and answer part tokenized on
its own and concatenated), so the length in the model's tokens is exact and the needle and label
positions are known without searching. The haystack is generated from a seed (varied sentences
from templates) or read from a user's text file.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lserve.errors import LServeError

NATO = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
)
MAX_PASSKEYS = len(ORDINALS)
# needles go at depths drawn from this many evenly spaced ratios in [0.05, 0.95] (as DuoAttention)
DEPTH_GRID = 1000

_SUBJECTS = (
    "The old fisherman", "A young teacher", "The village baker", "My neighbour", "The tired doctor",
    "A quiet student", "The town mayor", "Our grandmother", "The travelling merchant", "A curious child",
    "The night guard", "The ship's captain", "A retired soldier", "The gardener", "The librarian",
    "An artist from the coast", "The farmer's daughter", "A clever engineer", "The old priest", "The postman",
)
_VERBS = (
    "repaired", "painted", "carried", "found", "described", "cleaned", "sold", "borrowed", "forgot about",
    "talked about", "measured", "wrapped", "counted", "remembered", "planted", "examined", "moved",
    "photographed", "hid", "admired",
)
_OBJECTS = (
    "the wooden fence", "a basket of apples", "the broken clock", "an old map", "the blue boat",
    "a pile of letters", "the iron gate", "a pair of boots", "the stone bridge", "a jar of honey",
    "the kitchen table", "a bundle of firewood", "the church bell", "a small garden", "the red kite",
    "a box of candles", "the narrow staircase", "a loaf of bread", "the lighthouse lamp", "a winter coat",
)
_ENDINGS = (
    "before the storm", "on a rainy morning", "after the market closed", "late in the evening",
    "during the harvest", "while the children slept", "near the river", "at the edge of the forest",
    "for the spring festival", "without saying a word", "in the middle of winter", "as the sun went down",
    "behind the old mill", "on the way home", "with great care",
)


@dataclass(frozen=True)
class PasskeySample:
    """One calibration sample, as token ids with the positions the loss and the checks need."""

    input_ids: list[int]
    label_positions: list[int]
    """Positions whose hidden state predicts a passkey word of the answer (the loss positions)."""
    needle_positions: list[int]
    """Token index where each needle starts, in passkey order."""
    depths: list[float]
    """Requested depth of each needle as a fraction of the haystack."""
    haystack_span: tuple[int, int]
    """[start, end) token range of the haystack (needles included)."""
    passkeys: list[str]
    context_length: int
    """The length that was asked for; len(input_ids) matches it up to a few tokens."""

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class Haystack:
    """An endless, deterministic stream of filler sentences: generated, or from a text file."""

    def __init__(self, sentences: Sequence[str] | None = None) -> None:
        self._sentences = list(sentences) if sentences is not None else None

    @classmethod
    def from_file(cls, path: str | Path) -> Haystack:
        """Sentences of a UTF-8 text file (split at . ! ? and blank lines), used cyclically."""
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise LServeError(f"cannot read haystack file {str(path)!r}: {exc}") from exc
        parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
        sentences = [" ".join(s.split()) for s in parts if len(s.split()) >= 2]
        if len(sentences) < 10:
            raise LServeError(f"haystack file {str(path)!r} has too little text ({len(sentences)} sentences; need 10+)")
        return cls(sentences)

    def stream(self, rng: random.Random) -> Iterator[str]:
        if self._sentences is None:
            while True:
                yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
        start = rng.randrange(len(self._sentences))  # each sample reads from its own place in the file
        i = start
        while True:
            yield self._sentences[i % len(self._sentences)]
            i += 1


class PromptFormat:
    """The text around the haystack: the chat template's turn markers when the tokenizer has one."""

    def __init__(self, tokenizer: Any, use_chat_template: bool) -> None:
        self.tokenizer = tokenizer
        self.head, self.middle = "", "\n"
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            marker = "\x00HAYSTACK\x00"
            text = str(tokenizer.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True))
            self.head, self.middle = text.split(marker)
        bos = getattr(tokenizer, "bos_token_id", None)
        # plain text starts with BOS when the model uses one (chat templates spell their own start)
        self.bos = [bos] if isinstance(bos, int) and not self.head else []

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _passkey(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(NATO) for _ in range(length))


def make_sample(
    fmt: PromptFormat,
    haystack: Haystack,
    context_length: int,
    num_passkeys: int,
    passkey_length: int,
    rng: random.Random,
) -> PasskeySample:
    """A sample of `context_length` tokens: intro, haystack with needles, question, answer."""
    if not 1 <= num_passkeys <= MAX_PASSKEYS:
        raise LServeError(f"num_passkeys must be in [1, {MAX_PASSKEYS}], got {num_passkeys}")
    passkeys = [_passkey(rng, passkey_length) for _ in range(num_passkeys)]
    ords = ORDINALS[:num_passkeys]
    plural = "s" if num_passkeys > 1 else ""
    head = fmt.bos + fmt.encode(
        fmt.head + f"There {'are' if num_passkeys > 1 else 'is'} {num_passkeys} passkey{plural} to the vault "
        f"hidden in the text below. Find and remember {'them' if num_passkeys > 1 else 'it'}.\n\n")
    needles = [fmt.encode(f" Remember this sequence of words, it is the {o} passkey to the vault: {p}.")
               for o, p in zip(ords, passkeys, strict=True)]
    question = fmt.encode(f"\n\nWhat {'are' if num_passkeys > 1 else 'is'} the passkey{plural} to the vault? "
                          f"Give {'each one in order' if num_passkeys > 1 else 'it'}." + fmt.middle)
    answer: list[tuple[list[int], bool]] = []  # (tokens, is_label)
    for n, (o, p) in enumerate(zip(ords, passkeys, strict=True)):
        answer.append((fmt.encode(("" if n == 0 else "\n") + f"The {o} passkey to the vault is:"), False))
        answer.append((fmt.encode(" " + p), True))
        answer.append((fmt.encode("."), False))
    fixed = len(head) + sum(map(len, needles)) + len(question) + sum(len(t) for t, _ in answer)
    budget = context_length - fixed
    if budget < 16 * num_passkeys:
        raise LServeError(
            f"context length {context_length} is too short for {num_passkeys} passkeys of {passkey_length} words "
            f"(the question, needles and answer alone take {fixed} tokens)")

    # haystack sentences up to the budget; the last one is cut so the length is exact
    sentences: list[list[int]] = []
    used = 0
    for sentence in haystack.stream(rng):
        ids = fmt.encode(" " + sentence)
        sentences.append(ids[: budget - used])
        used += len(sentences[-1])
        if used >= budget:
            break
    starts = [0]
    for s in sentences:
        starts.append(starts[-1] + len(s))  # token offset of each sentence boundary
    depths = [0.05 + 0.9 * i / (DEPTH_GRID - 1) for i in sorted(rng.sample(range(DEPTH_GRID), num_passkeys))]
    # each needle goes to the sentence boundary nearest its depth; boundaries only move forward
    cuts, last = [], 0
    for d in depths:
        target = d * budget
        best = min(range(last, len(starts)), key=lambda b: (abs(starts[b] - target), b))
        cuts.append(best)
        last = best

    ids = list(head)
    needle_positions: list[int] = []
    hay_start = len(ids)
    for b in range(len(sentences) + 1):
        for k, cut in enumerate(cuts):
            if cut == b:
                needle_positions.append(len(ids))
                ids.extend(needles[k])
        if b < len(sentences):
            ids.extend(sentences[b])
    hay_end = len(ids)
    ids.extend(question)
    labels: list[int] = []
    for tokens, is_label in answer:
        if is_label:
            labels.extend(range(len(ids) - 1, len(ids) - 1 + len(tokens)))  # the state before each word predicts it
        ids.extend(tokens)
    return PasskeySample(ids, labels, needle_positions, depths, (hay_start, hay_end), passkeys, context_length)


def make_dataset(
    tokenizer: Any,
    context_lengths: Sequence[int],
    num_passkeys: int,
    passkey_length: int,
    seed: int,
    haystack_file: str | Path | None = None,
    use_chat_template: bool = True,
) -> list[PasskeySample]:
    """One sample per entry of `context_lengths`, all determined by `seed`."""
    fmt = PromptFormat(tokenizer, use_chat_template)
    haystack = Haystack.from_file(haystack_file) if haystack_file is not None else Haystack()
    rng = random.Random(seed)
    return [make_sample(fmt, haystack, n, num_passkeys, passkey_length, random.Random(rng.getrandbits(64)))
            for n in context_lengths]
