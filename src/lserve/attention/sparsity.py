"""Static head sparsity handed to an attention backend: which KV heads stream, and their windows.

The model knows nothing of this: the backend applies it per layer. A streaming head sees key j
from query i iff j <= i and (j < sink or i - j < local); prefill and decode have their own windows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadSparsity:
    streaming_heads: tuple[torch.Tensor, ...]
    """Per layer, (Hkv,) bool on the cache's device: True for a streaming head."""
    prefill_sink: int
    prefill_local: int
    decode_sink: int
    decode_local: int

    @functools.cached_property
    def streaming_fraction(self) -> float:
        """Fraction of all KV heads (over every layer) that stream. Computed once: the flags live
        on the device, and engine statistics read this every step."""
        total = sum(f.numel() for f in self.streaming_heads)
        return sum(int(f.sum()) for f in self.streaming_heads) / total if total else 0.0

    def layer(self, layer_idx: int) -> torch.Tensor | None:
        """The layer's streaming-head flags, or None when all its heads are dense."""
        flags = self.streaming_heads[layer_idx]
        return flags if bool(flags.any()) else None
