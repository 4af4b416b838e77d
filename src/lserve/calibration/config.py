"""Settings of a calibration run (no torch import: the CLI builds its flags from these defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lserve.calibration.data import MAX_PASSKEYS

DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes


def spread(low: int, high: int, num: int) -> tuple[int, ...]:
    """`num` context lengths evenly spaced from `low` to `high` (as DuoAttention's range)."""
    if num == 1 or low == high:
        return (low,) * max(1, num)
    return tuple(round(low + (high - low) * i / (num - 1)) for i in range(num))


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of one calibration run; invalid values raise ValueError with the field's name."""

    output: str
    model: str | None = None  # None: the embedded default model
    load_format: str = "auto"
    steps: int = 250
    lr: float = 0.02
    reg: float = 0.05
    context_lengths: tuple[int, ...] = field(default_factory=lambda: spread(1024, 3072, 50))
    sink: int = 64
    local: int = 512
    num_passkeys: int = 10
    passkey_length: int = 8
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    haystack_file: str | None = None
    chat_template: bool = True
    save_every: int = 50
    checkpoint_layers: bool = False

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("sink", 0), ("local", 1), ("num_passkeys", 1), ("passkey_length", 1),
                          ("seed", 0), ("save_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.num_passkeys > MAX_PASSKEYS:
            raise ValueError(f"num_passkeys must be at most {MAX_PASSKEYS}, got {self.num_passkeys}")
        for name in ("lr", "reg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if not self.context_lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                           for n in self.context_lengths):
            raise ValueError(f"context_lengths must be positive integers, got {self.context_lengths!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not one of 'auto', 'cpu', 'cuda'")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype={self.dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}")
