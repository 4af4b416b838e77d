"""Engine statistics: one snapshot type read by the server's /metrics, `lserve bench` and tests.

Counters are cumulative since the engine started; gauges describe the moment of the snapshot.
The sparse-attention fields are zero while the matching sparsity is off.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    # gauges
    num_running: int
    """Requests holding KV pages (prefilling or decoding)."""
    num_waiting: int
    """Requests queued for their first (or, after a preemption, next) prefill chunk."""
    kv_pages_total: int
    kv_pages_used: int
    streaming_head_fraction: float
    """Fraction of the model's KV heads that are streaming heads (0 when static sparsity is off)."""
    last_decode_pages_read_fraction: float
    """KV pages the last decode step read / pages the same step would read densely (1.0 = dense)."""
    # counters
    num_prompt_tokens: int
    num_generation_tokens: int
    num_preemptions: int
    num_decode_steps: int
    decode_pages_read: int
    """KV pages (summed over layers, KV heads and sequences) read by decode steps."""
    decode_pages_dense: int
    """The pages the same decode steps would have read with dense attention."""
    prefix_cache_queries: int = 0
    """Tokens of admitted requests looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens the cache held (their KV was not computed again)."""

    @property
    def kv_cache_usage(self) -> float:
        """Used fraction of the paged KV pool, in [0, 1]."""
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def decode_pages_read_fraction(self) -> float:
        """Pages read / pages a dense decode would read, over all decode steps so far (1.0 = dense)."""
        return self.decode_pages_read / self.decode_pages_dense if self.decode_pages_dense else 1.0
