"""Passkey retrieval: a random five-digit key hidden in the repeated grass/sky/sun filler.

The prompt has a task line, the filler fitted to the requested length, the key line at the
requested depth and the question. Scoring: the first number of the answer must equal the key.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lserve.eval.sample import (
    Haystack,
    Needle,
    PromptFormat,
    Sample,
    Template,
    fit_prompt,
)
from lserve.eval.text import filler_sentences

TEMPLATE = Template(
    intro=(
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n\n"
    ),
    question="\n\nWhat is the pass key? Answer with the number only.",
    answer_prefix="The pass key is",
)
MAX_TOKENS = 16


def spread_depths(num_samples: int) -> list[float]:
    """Depths spread evenly over the haystack, one per sample: (i + 0.5) / n."""
    return [(i + 0.5) / num_samples for i in range(num_samples)]


def needle_text(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_passkey_samples(
    fmt: PromptFormat,
    lengths: Sequence[int],
    num_samples: int,
    depths: Sequence[float] | None = None,
    seed: int = 0,
    max_tokens: int = MAX_TOKENS,
) -> list[Sample]:
    """`num_samples` per length (and per depth when depths are given; otherwise spread evenly)."""
    haystack = Haystack(filler_sentences())
    samples = []
    for length in lengths:
        cells = [(d, i) for d in depths for i in range(num_samples)] if depths else list(
            zip(spread_depths(num_samples), range(num_samples))
        )
        for depth, i in cells:
            rng = random.Random(f"{seed}/passkey/{length}/{depth:.6f}/{i}")
            key = str(rng.randint(10000, 99999))
            needles = [Needle(depth, needle_text(key))]
            fitted = fit_prompt(fmt, TEMPLATE, lambda n, nd=needles: haystack.text(n, nd), length, "passkey prompt")
            samples.append(Sample(
                task="passkey", subtask="", length=length, depth=depth, index=i,
                user_text=fitted.user_text, prompt_text=fitted.prompt_text, prompt_ids=fitted.prompt_ids,
                answers=[key], scorer="first_number", max_tokens=max_tokens, chat=fmt.chat,
            ))
    return samples
