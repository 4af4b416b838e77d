"""Offline text material for the synthetic tasks: word lists, haystack sentence streams, keys, values.

Everything is generated from a `random.Random` the caller seeds, so the same seed gives the same
text on every machine. Nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path


def _words(text: str) -> list[str]:
    return text.split()


PASSKEY_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
"""The classic passkey filler (Landmark Attention), one sentence per item, repeated in order."""

NOUNS = _words("""
apple anchor answer apron arrow attic badge bakery balloon banner barrel basket battery beach beacon
bell bicycle blanket boat bottle bridge brush bucket button cabin cable camera canal candle canyon
carpet castle cellar chair chapel cherry chimney circle cliff clock cloud coat coin comet compass
cottage cradle crystal cup curtain desert diary door dragon drawer drum eagle engine envelope falcon
feather fence field flag flute forest fountain garden gate glacier glove harbor hammer harp helmet
hill horizon island jacket jar jewel kettle key kitchen ladder lake lamp lantern leaf library
lighthouse lion magnet map marble meadow mirror monkey mountain needle nest notebook ocean orchard
owl paddle palace panther parrot pebble pencil piano pillow planet pocket pond puzzle quilt rabbit
raft ribbon river road rocket saddle sail scarf shadow shell shield ship shovel signal silver sky
sled spoon square stable stairs statue stone storm stream sugar swan table teapot temple tent
thunder tiger tower tractor train treasure tunnel umbrella valley village violin wagon wall wave
whistle window wolf yard canoe mill ferry quarry tavern wheel orbit lagoon summit plaza""")

ADJECTIVES = _words("""
able ancient angry bold brave bright broad busy calm careful cheerful clever cold cosmic crooked
curious damp dark deep delicate dizzy dusty eager early elegant empty fair famous fancy fast fierce
flat fluffy fragile fresh friendly gentle giant glad golden graceful green grumpy happy heavy hidden
hollow honest huge humble icy jolly kind large lazy little lively lonely loud lucky marble mellow
mighty misty modern narrow neat nervous noble odd old orange pale patient plain polite proud purple
quick quiet rapid rare rough round royal rusty sandy shiny short silent simple sleepy slow small
smooth soft solid sour spicy steady sticky stormy strange strong sunny sweet swift tall tame tender
thin tidy tiny velvet vivid warm wild windy wise wooden young zealous""")

VERBS = [  # (base form, past tense)
    ("carry", "carried"), ("paint", "painted"), ("follow", "followed"), ("watch", "watched"),
    ("visit", "visited"), ("clean", "cleaned"), ("build", "built"), ("find", "found"), ("hold", "held"),
    ("move", "moved"), ("open", "opened"), ("close", "closed"), ("fix", "fixed"), ("guard", "guarded"),
    ("pass", "passed"), ("reach", "reached"), ("cross", "crossed"), ("lift", "lifted"), ("push", "pushed"),
    ("pull", "pulled"), ("study", "studied"), ("measure", "measured"), ("describe", "described"),
    ("remember", "remembered"), ("notice", "noticed"), ("collect", "collected"), ("deliver", "delivered"),
    ("explore", "explored"), ("repair", "repaired"), ("share", "shared"), ("sketch", "sketched"),
    ("borrow", "borrowed"), ("polish", "polished"), ("gather", "gathered"), ("admire", "admired"),
]

ADVERBS = _words("""slowly quickly quietly gladly carefully eagerly gently boldly calmly warmly softly proudly
rarely often suddenly patiently happily neatly""")

PLACES = (
    "market square", "harbor town", "old library", "village green", "river bank", "city hall",
    "mountain pass", "train station", "public garden", "school yard", "small bakery", "north road",
    "east gate", "west field",
)

NAMES = _words("""Alice Bruno Clara Daniel Elena Felix Grace Hugo Irene Jonas Karen Leo Maria Nora Oscar
Paula Quentin Rosa Samuel Tara Victor Wendy Xavier Yara Zoe Arthur Bianca Cyrus Delia Emil""")

CITIES = _words("""Amsterdam Athens Bangkok Barcelona Berlin Bogota Boston Budapest Cairo Chicago Dublin
Edinburgh Florence Geneva Hamburg Havana Helsinki Istanbul Jakarta Kyoto Lagos Lima Lisbon London
Madrid Manila Melbourne Mexico Milan Montreal Moscow Mumbai Munich Nairobi Oslo Paris Prague Quebec
Rome Santiago Seattle Seoul Stockholm Sydney Taipei Tokyo Toronto Vienna Warsaw Zurich""")

TIMES = (
    "at dawn", "at noon", "in the evening", "before sunrise", "after the rain", "during the winter",
    "last spring", "every morning", "on a Sunday", "late at night", "in the autumn", "after lunch",
)

_PROSE_TEMPLATES = (
    "The {adj} {noun} {past} the {adj2} {noun2} near the {noun3}.",
    "{name} {past} the {noun} {time}.",
    "Every {noun} in the {place} looked {adj} {time}.",
    "Nobody expected the {noun} to {verb} the {noun2} so {adverb}.",
    "In the {place}, a {adj} {noun} waited {adverb} for the {noun2}.",
    "{name} said that the {adj} {noun} would {verb} the {noun2} {time}.",
    "A {adj} {noun} and a {adj2} {noun2} {past} the {noun3} together.",
    "When the {noun} was {adj}, {name} {past} it {adverb}.",
    "The story of the {noun} and the {noun2} was told {adverb} in the {place}.",
    "{name} and {name2} {past} a {adj} {noun} beside the {noun2}.",
)

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def filler_sentences() -> Iterator[str]:
    """The passkey filler, sentence by sentence, forever."""
    while True:
        yield from PASSKEY_FILLER


def prose_sentences(rng: random.Random) -> Iterator[str]:
    """Varied, grammatical nonsense sentences (the generated haystack for needle-in-a-haystack)."""
    while True:
        template = rng.choice(_PROSE_TEMPLATES)
        verb, past = rng.choice(VERBS)
        n1, n2, n3 = rng.sample(NOUNS, 3)
        a1, a2 = rng.sample(ADJECTIVES, 2)
        name, name2 = rng.sample(NAMES, 2)
        sentence = template.format(
            adj=a1, adj2=a2, noun=n1, noun2=n2, noun3=n3, verb=verb, past=past, adverb=rng.choice(ADVERBS),
            place=rng.choice(PLACES), name=name, name2=name2, time=rng.choice(TIMES),
        )
        sentence = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", sentence)  # "a odd" -> "an odd"
        yield sentence[0].upper() + sentence[1:]


def file_sentences(path: Path) -> Iterator[str]:
    """Sentences of a user's text file, repeated from the start when it runs out."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read haystack file {path}: {exc}") from exc
    sentences = split_sentences(text)
    if not sentences:
        raise ValueError(f"haystack file {path} holds no text")
    while True:
        yield from sentences


def split_sentences(text: str) -> list[str]:
    """Split text at '.', '!' or '?' followed by white space; white space inside is collapsed."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]


def make_key(rng: random.Random, taken: set[str]) -> str:
    """A fresh `adjective-noun` key (as RULER's keys), unique within `taken` (which it extends)."""
    for _ in range(10_000):
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key
    raise RuntimeError("ran out of distinct keys")


def make_number(rng: random.Random, digits: int, taken: set[str]) -> str:
    """A fresh random number with exactly `digits` digits (no leading zero), unique within `taken`."""
    for _ in range(10_000):
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("ran out of distinct numbers")


def make_pseudo_word(rng: random.Random, taken: set[str], syllables: int = 3) -> str:
    """A pronounceable made-up lowercase word (`bokafi`), unique within `taken`."""
    for _ in range(10_000):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            return word
    raise RuntimeError("ran out of distinct pseudo-words")


def make_var_name(rng: random.Random, taken: set[str]) -> str:
    """A fresh five-letter upper-case variable name (`QWHTZ`)."""
    for _ in range(10_000):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("ran out of distinct variable names")


def word_pool(rng: random.Random, count: int) -> list[str]:
    """`count` distinct lowercase words: the real word lists shuffled, then made-up words if needed."""
    real = sorted(set(NOUNS) | set(ADJECTIVES) | {v for v, _ in VERBS} | set(ADVERBS))
    rng.shuffle(real)
    words = real[:count]
    taken = set(real)
    while len(words) < count:
        words.append(make_pseudo_word(rng, taken))
    return words
