"""Exact scoring: no partial string credit, no fuzzy matching, near-misses score zero.

- `first_number` (passkey, niah): the first whole number in the answer must equal the reference
  (digit groups written with commas, `12,345`, are read as one number; a decimal `12345.6` is
  not `12345`). `1234` or `123456` for `12345` score 0, as does the right number after a wrong one.
- `all_words` (RULER tasks): the fraction of references that occur in the answer as whole words,
  case-insensitively (RULER's string_match_all, made stricter by word boundaries: `1234567` does
  not match inside `12345678`, nor `apple` inside `apples`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")


def first_number(text: str) -> str | None:
    """The first whole number in `text`, commas between digit groups removed; None if there is none."""
    match = _NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` with no letter, digit or underscore right before or after it."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def score_first_number(output: str, answers: Sequence[str]) -> float:
    return 1.0 if first_number(output) == answers[0] else 0.0


def score_all_words(output: str, answers: Sequence[str]) -> float:
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    return sum(contains_word(output, a) for a in answers) / len(answers)


SCORERS = {"first_number": score_first_number, "all_words": score_all_words}


def score(scorer: str, output: str, answers: Sequence[str]) -> float:
    """Score one output in [0, 1] with the named rule."""
    try:
        rule = SCORERS[scorer]
    except KeyError:
        raise ValueError(f"unknown scorer {scorer!r}") from None
    return rule(output, answers)
