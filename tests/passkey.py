"""A passkey-retrieval prompt: a random key hidden in repetitive filler (used by tests and benchmarks)."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_messages(num_filler: int, seed: int, depth: float = 0.5) -> tuple[list[dict[str, str]], str]:
    """(chat messages, key): `num_filler` filler sentences with the key line at relative `depth`."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    cut = int(num_filler * depth)
    body = FILLER * cut + needle + FILLER * (num_filler - cut)
    question = "\n\nWhat is the pass key? Answer with the number only."
    return [{"role": "user", "content": body + question}], key
