"""RULER-style synthetic tasks (after arXiv 2404.06654), generated offline from seeded word lists.

Subtasks (names follow RULER's categories; the text and generators are lserve's own):
- `niah_single`: one key -> seven-digit number needle in the repeated filler ("noise" haystack).
- `niah_multikey`: the haystack is made of distractor needles for other keys; one key is asked.
- `niah_multivalue`: one key has four numbers scattered over generated prose; all four are asked.
- `niah_multiquery`: four keys with a number each in generated prose; all four numbers are asked.
- `vt`: variable tracking, a chain of five assignments (`VAR B = VAR A`) in the filler; every
  variable holding the value is asked.
- `cwe`: common-word extraction from a numbered word list: the ten words that occur most often.
- `fwe`: frequent-word extraction from made-up words drawn with a Zipf law (exponent 2): the top three.
Scores are the fraction of references found as whole words (RULER's string_match_all, stricter).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from lserve.eval.sample import (
    Fitted,
    Haystack,
    Needle,
    PromptFormat,
    Sample,
    Template,
    fit_prompt,
)
from lserve.eval.text import (
    filler_sentences,
    make_key,
    make_number,
    make_pseudo_word,
    make_var_name,
    prose_sentences,
    word_pool,
)

NIAH_INTRO = (
    "A long text follows. Special magic numbers are hidden in it; remember them, "
    "you will be asked about them afterwards.\n\n"
)


@dataclass
class Sources:
    """Haystacks shared by the samples of one run (the same text, different needles)."""

    noise: Haystack
    prose: Haystack


MakeFn = Callable[[PromptFormat, int, random.Random, Sources], tuple[Fitted, list[str]]]


@dataclass(frozen=True)
class Subtask:
    name: str
    max_tokens: int
    """Answer tokens: room for a chat model's full sentence (digits and made-up words take several
    tokens each in small vocabularies); an answer cut short loses the references it did not reach."""
    make: MakeFn


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _fit_with_needles(
    fmt: PromptFormat, template: Template, haystack: Haystack, needles: list[Needle], length: int, what: str
) -> Fitted:
    return fit_prompt(fmt, template, lambda n: haystack.text(n, needles), length, what)


def _niah_single(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    key, value = make_key(rng, set()), make_number(rng, 7, set())
    template = Template(NIAH_INTRO, f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
                        "Answer with the number only.", f"The special magic number for {key} is")
    fitted = _fit_with_needles(fmt, template, src.noise, [Needle(rng.random(), _needle(key, value))], length,
                               "niah_single prompt")
    return fitted, [value]


def _distractors(rng: random.Random, keys: set[str], values: set[str]) -> Iterator[str]:
    while True:
        yield _needle(make_key(rng, keys), make_number(rng, 7, values))


def _niah_multikey(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    keys: set[str] = set()
    values: set[str] = set()
    key, value = make_key(rng, keys), make_number(rng, 7, values)
    haystack = Haystack(_distractors(random.Random(rng.random()), keys, values))
    template = Template(NIAH_INTRO, f"\n\nWhat is the special magic number for {key} mentioned in the text above? "
                        "Answer with the number only.", f"The special magic number for {key} is")
    fitted = _fit_with_needles(fmt, template, haystack, [Needle(rng.random(), _needle(key, value))], length,
                               "niah_multikey prompt")
    return fitted, [value]


def _niah_multivalue(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    key = make_key(rng, set())
    taken: set[str] = set()
    values = [make_number(rng, 7, taken) for _ in range(4)]
    needles = [Needle(rng.random(), _needle(key, v)) for v in values]
    template = Template(NIAH_INTRO, f"\n\nWhat are all the special magic numbers for {key} mentioned in the text "
                        "above? List every one of them.", f"The special magic numbers for {key} are")
    return _fit_with_needles(fmt, template, src.prose, needles, length, "niah_multivalue prompt"), values


def _niah_multiquery(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    keys_taken: set[str] = set()
    taken: set[str] = set()
    pairs = [(make_key(rng, keys_taken), make_number(rng, 7, taken)) for _ in range(4)]
    needles = [Needle(rng.random(), _needle(k, v)) for k, v in pairs]
    names = ", ".join(k for k, _ in pairs[:-1]) + f" and {pairs[-1][0]}"
    template = Template(NIAH_INTRO, f"\n\nWhat are the special magic numbers for {names} mentioned in the text "
                        "above? Give the number for each of them.", f"The special magic numbers for {names} are")
    return _fit_with_needles(fmt, template, src.prose, needles, length, "niah_multiquery prompt"), [v for _, v in pairs]


def _vt(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    taken: set[str] = set()
    names = [make_var_name(rng, taken) for _ in range(5)]
    value = make_number(rng, 5, set())
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    depths = sorted(rng.random() for _ in lines)
    needles = [Needle(d, line) for d, line in zip(depths, lines)]
    template = Template(
        "Memorize and track the chain of variable assignments hidden in the following text.\n\n",
        f"\n\nWhich variables are assigned the value {value}, directly or through other variables? "
        "Answer with all of their names.",
        f"The variables assigned the value {value} are:",
    )
    return _fit_with_needles(fmt, template, src.noise, needles, length, "vt prompt"), names


def _cwe(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    """Ten common words repeated `fc` times among `n` rarer words repeated `fu` times (n is fitted)."""
    probe = word_pool(random.Random(rng.random()), 50)
    per_entry = fmt.count("\n".join(f"{i + 100}. {w}" for i, w in enumerate(probe))) / len(probe)
    entries = max(20.0, length / per_entry)
    fc = int(min(30, max(3, round(0.3 * entries / 10))))
    fu = 3 if fc >= 10 else 2 if fc >= 4 else 1
    pool = word_pool(random.Random(rng.random()), 10 + int(2 * entries) + 50)
    common, rare = pool[:10], pool[10:]
    order_seed = rng.random()

    def context(n: int) -> str:
        words = common * fc + rare[: min(n, len(rare))] * fu
        random.Random(f"{order_seed}/{n}").shuffle(words)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    template = Template(
        "Below is a numbered list of words. Some of the words appear many times.\n\n",
        "\n\nWhat are the 10 most common words in the list above? Answer with the words only.",
        "The 10 most common words are:",
    )
    return fit_prompt(fmt, template, context, length, "cwe prompt"), list(common)


def zipf_counts(total: int, vocab: int, exponent: float = 2.0) -> list[int]:
    """Counts per rank summing to `total` (Zipf-shaped), with the top three strictly above the rest."""
    weights = [r**-exponent for r in range(1, vocab + 1)]
    scale = total / sum(weights)
    counts = [int(w * scale) for w in weights]
    rank = vocab - 1
    for _ in range(total - sum(counts)):  # leftovers go to the rare words, never to the top three
        counts[rank] += 1
        rank = rank - 1 if rank > 3 else vocab - 1
    rest = max(counts[3:], default=0)
    counts[2] = max(counts[2], rest + 1)
    counts[1] = max(counts[1], counts[2] + 1)
    counts[0] = max(counts[0], counts[1] + 1)
    return counts


def _fwe(fmt: PromptFormat, length: int, rng: random.Random, src: Sources) -> tuple[Fitted, list[str]]:
    taken: set[str] = set()
    vocab = [make_pseudo_word(rng, taken) for _ in range(60)]
    order_seed = rng.random()

    def context(n: int) -> str:
        words = [w for w, c in zip(vocab, zipf_counts(n, len(vocab))) for _ in range(c)] if n else []
        random.Random(f"{order_seed}/{n}").shuffle(words)
        return " ".join(words)

    template = Template(
        "Read the coded text below and keep track of how often each coded word appears.\n\n",
        "\n\nWhat are the three most frequent coded words in the text above? Answer with the three words only.",
        "The three most frequent coded words are:",
    )
    return fit_prompt(fmt, template, context, length, "fwe prompt"), vocab[:3]


SUBTASKS: dict[str, Subtask] = {
    s.name: s for s in (
        Subtask("niah_single", 32, _niah_single),
        Subtask("niah_multikey", 32, _niah_multikey),
        Subtask("niah_multivalue", 96, _niah_multivalue),
        Subtask("niah_multiquery", 96, _niah_multiquery),
        Subtask("vt", 64, _vt),
        Subtask("cwe", 120, _cwe),
        Subtask("fwe", 50, _fwe),
    )
}


def parse_subtasks(text: str | None) -> list[str]:
    """`niah_single,vt` -> names (all subtasks when None); an unknown name is a one-line error."""
    if not text:
        return list(SUBTASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SUBTASKS]
    if unknown or not names:
        raise ValueError(f"unknown ruler subtask {unknown[0] if unknown else text!r}; choose from {', '.join(SUBTASKS)}")
    return list(dict.fromkeys(names))


def make_ruler_samples(
    fmt: PromptFormat,
    lengths: Sequence[int],
    subtasks: Sequence[str],
    num_samples: int,
    seed: int = 0,
    max_tokens: int | None = None,
) -> list[Sample]:
    """`num_samples` per (subtask, length); the needles of each sample at seeded random depths."""
    src = Sources(Haystack(filler_sentences()), Haystack(prose_sentences(random.Random(f"{seed}/ruler/prose"))))
    samples = []
    for name in subtasks:
        sub = SUBTASKS[name]
        for length in lengths:
            for i in range(num_samples):
                rng = random.Random(f"{seed}/ruler/{name}/{length}/{i}")
                fitted, answers = sub.make(fmt, length, rng, src)
                samples.append(Sample(
                    task="ruler", subtask=name, length=length, depth=None, index=i,
                    user_text=fitted.user_text, prompt_text=fitted.prompt_text, prompt_ids=fitted.prompt_ids,
                    answers=answers, scorer="all_words", max_tokens=max_tokens or sub.max_tokens, chat=fmt.chat,
                ))
    return samples
