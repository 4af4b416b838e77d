"""Needle in a haystack over a grid of lengths x depths.

The haystack is generated prose (varied sentences from word lists, seeded) or the sentences of a
text file the user gives, repeated as needed; it is the same text for every cell, as in the
classic test. The needle is a city's seven-digit secret code; the answer is scored exactly (the
first number of the answer must be the code), so no LLM judge is needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from lserve.eval.sample import (
    Haystack,
    Needle,
    PromptFormat,
    Sample,
    Template,
    fit_prompt,
)
from lserve.eval.text import CITIES, file_sentences, make_number, prose_sentences

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_TOKENS = 24
INTRO = "Read the document below and answer the question after it.\n\n<document>\n"


def template_for(city: str) -> Template:
    return Template(
        intro=INTRO,
        question=f"\n</document>\n\nWhat is the secret code of {city}? Answer with the number only.",
        answer_prefix=f"The secret code of {city} is",
    )


def needle_text(city: str, code: str) -> str:
    return f"The secret code of {city} is {code}."


def make_niah_samples(
    fmt: PromptFormat,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    num_samples: int = 1,
    seed: int = 0,
    haystack_file: Path | None = None,
    max_tokens: int = MAX_TOKENS,
) -> list[Sample]:
    """`num_samples` per (length, depth) cell; each sample has its own city and code."""
    source = file_sentences(haystack_file) if haystack_file else prose_sentences(random.Random(f"{seed}/niah/haystack"))
    haystack = Haystack(source)
    samples = []
    for length in lengths:
        for depth in depths:
            for i in range(num_samples):
                rng = random.Random(f"{seed}/niah/{length}/{depth:.6f}/{i}")
                city = rng.choice(CITIES)
                code = make_number(rng, 7, set())
                needles = [Needle(depth, needle_text(city, code))]
                fitted = fit_prompt(
                    fmt, template_for(city), lambda n, nd=needles: haystack.text(n, nd), length, "niah prompt"
                )
                samples.append(Sample(
                    task="niah", subtask="", length=length, depth=depth, index=i,
                    user_text=fitted.user_text, prompt_text=fitted.prompt_text, prompt_ids=fitted.prompt_ids,
                    answers=[code], scorer="first_number", max_tokens=max_tokens, chat=fmt.chat,
                ))
    return samples
