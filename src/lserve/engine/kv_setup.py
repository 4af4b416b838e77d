"""Sizing and allocating the engine's KV memory: the paged pool and the pools whose pages a
sequence holds only while its windows reach them (the streaming heads' ring pool, the
sliding-window layers' window pool).

Which heads go where: a full-attention layer's dense heads are paged, its streaming heads in the
ring; a sliding-window layer's heads in the window pool. With the prefix cache on
(`fixed_pools` False) there is neither: every head is paged (a ring cannot be rebuilt from
cached pages) and the windows apply as masks. The ring and window pools are sized first, for
the most that `max_num_seqs` running sequences hold at once (their sinks and windows, plus one
step's prefill chunks: `RingGeometry.pool_pages`), but for fewer requests if that would take more
than the share of the KV memory that keeping those heads out of the paged pool saves (`_seats`);
the paged pool takes the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lserve.config import EngineConfig
from lserve.kv_cache.fp8 import resolve_kv_cache_dtype
from lserve.kv_cache.layout import (
    KVCache,
    KVCacheTensors,
    KVShape,
    RingGeometry,
    dense_head_ids,
    memory_budget_bytes,
    plan_num_pages,
    stats_bytes_per_page,
)
from lserve.kv_cache.ring_pages import pool_tensor_pages
from lserve.model.config import ArchConfig
from lserve.sparse.selection import ScoreSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVSetup:
    """The allocated KV memory and what was decided on the way."""

    cache: KVCache
    num_pages: int
    """Pages the KV manager hands out (the tensors hold one more: the scratch page of graphs)."""
    num_seats: int
    """Requests that may hold KV at once (fewer than `max_num_seqs` when their ring and window
    pools do not fit)."""


def window_pools(
    arch: ArchConfig, config: EngineConfig, dtype: torch.dtype, kv_dtype: torch.dtype,
    n_stream: tuple[int, ...] | None, pooled: tuple[int | None, ...],
) -> dict[str, tuple[KVShape, RingGeometry]]:
    """The pools of windowed heads, as (shape, geometry): "ring" for streaming heads (`n_stream`
    per layer), "window" for the layers with a window in `pooled`; K and V stored in `kv_dtype`."""
    cache, sparse = config.cache, config.sparse
    pools: dict[str, tuple[KVShape, RingGeometry]] = {}
    if n_stream is not None:
        pools["ring"] = (
            KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.page_size, dtype, n_stream, kv_dtype),
            RingGeometry(cache.page_size, max(sparse.prefill_sink_tokens, sparse.decode_sink_tokens),
                         sparse.decode_local_tokens, sparse.prefill_local_tokens))
    if any(w is not None for w in pooled):
        pools["window"] = (
            KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.page_size, dtype,
                    tuple(0 if w is None else arch.num_kv_heads for w in pooled), kv_dtype),
            RingGeometry(cache.page_size, 0, *(max(w for w in pooled if w is not None),) * 2))
    return pools


def _seats(config: EngineConfig, device: torch.device, pool_bytes: Callable[[int], int], saved_share: float) -> int:
    """`max_num_seqs`, or fewer when the ring and window pools for them (`pool_bytes(seats)`)
    would take more than `saved_share` of the KV memory: the share of a page's bytes that the
    paged pool no longer holds (the streaming heads' and the window layers'). Then the paged pool
    keeps at least the tokens an all-paged cache of the same memory would hold, so these pools
    never lower the longest request that fits."""
    cache, wanted = config.cache, config.scheduler.max_num_seqs
    if pool_bytes(wanted) == 0 or cache.num_kv_pages is not None:
        return wanted
    allowed = memory_budget_bytes(device, cache.kv_cache_memory_fraction, cache.kv_cache_memory_bytes) * saved_share
    seats = wanted
    while seats > 1 and pool_bytes(seats) > allowed:
        seats = max(1, min(seats - 1, int(seats * allowed / pool_bytes(seats))))
    if seats < wanted:  # (not a fault: vLLM too reports the concurrency its KV memory allows)
        logger.info("%d requests run at once (max_num_seqs=%d): the ring and window pools take at most the "
                    "%.0f%% of the KV memory that they save from the paged pool", seats, wanted, 100 * saved_share)
    return seats


def build_kv_cache(
    arch: ArchConfig, config: EngineConfig, dtype: torch.dtype, device: torch.device,
    streaming_flags: tuple[torch.Tensor, ...] | None, page_score: ScoreSpec | None, *,
    fixed_pools: bool, max_model_len: int, agree: Callable[[int], int] = lambda n: n,
    log: bool = True,
) -> KVSetup:
    """Size and allocate the pools for the model, its streaming heads (flags per layer, or None)
    and its page score (None: no page selection). `agree` turns a count this process planned
    into the one every tensor-parallel rank uses (the smallest), so that one page table and one
    set of seats serve them all. `log`: say what was allocated at INFO level (else DEBUG: the
    start-up profile's provisional cache)."""
    cache = config.cache
    windows = arch.layer_windows
    # the layers kept in the window pool (none with window_pool off: they are paged, windowed)
    pooled = windows if cache.window_pool and fixed_pools else (None,) * arch.num_layers
    flags = streaming_flags
    use_ring = fixed_pools and flags is not None and any(bool(f.any()) for f in flags)
    n_stream = tuple(int(f.sum()) for f in flags) if use_ring and flags is not None else (0,) * arch.num_layers
    paged_heads = tuple(0 if w is not None else arch.num_kv_heads - n for w, n in zip(pooled, n_stream))
    split = use_ring or any(w is not None for w in pooled)
    kv_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype)
    shape = KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.page_size, dtype,
                    paged_heads if split else None, kv_dtype)
    logical = config.sparse.logical_page_size if page_score is not None and not page_score.uses_labels else None
    pools = window_pools(arch, config, dtype, kv_dtype, n_stream if use_ring else None, pooled)
    step_tokens = config.scheduler.max_num_batched_tokens

    def tensor_pages(geometry: RingGeometry, n: int) -> int:
        """A ring or window pool's pages for `n` running requests (its spare pages included)."""
        return pool_tensor_pages(geometry.pool_pages(n, step_tokens, max_model_len))

    def pool_bytes(n: int) -> int:
        return sum(tensor_pages(geometry, n) * pshape.bytes_per_page for pshape, geometry in pools.values())

    all_paged = KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.page_size, dtype, None, kv_dtype)
    seats = agree(_seats(config, device, pool_bytes, 1.0 - shape.bytes_per_page / all_paged.bytes_per_page))
    windowed = {name: KVCacheTensors(pshape, tensor_pages(geometry, seats), device)
                for name, (pshape, geometry) in pools.items()}
    num_pages = agree(plan_num_pages(
        shape, device, num_kv_pages=cache.num_kv_pages, memory_fraction=cache.kv_cache_memory_fraction,
        memory_bytes=cache.kv_cache_memory_bytes, max_useful_pages=seats * -(-max_model_len // cache.page_size),
        reserved_bytes=pool_bytes(seats),
        extra_bytes_per_page=stats_bytes_per_page(shape, logical, page_score.num_channels if page_score else 0,
                                                  page_score is not None and page_score.label_fp8),
    ))
    label_channels = None
    if page_score is not None and page_score.channels is not None:
        # the channels of the heads the paged pool holds (a layer's dense heads, with a ring pool)
        pool_heads = dense_head_ids(flags) if use_ring and flags is not None \
            else [list(range(arch.num_kv_heads))] * arch.num_layers
        pool_heads = [[] if w is not None else heads for w, heads in zip(pooled, pool_heads)]
        label_channels = [page_score.channels[i, heads] for i, heads in enumerate(pool_heads)]
    # one page more than the manager hands out: the scratch page of padded graph rows
    paged = KVCacheTensors(shape, num_pages + 1, device, logical, label_channels,
                           label_fp8=page_score is not None and page_score.label_fp8)
    kv = KVCache(paged, windowed.get("ring"), flags if use_ring else None, pools["ring"][1] if use_ring else None,
                 windowed.get("window"), pools["window"][1] if "window" in pools else None, windows)
    say = logger.info if log else logger.debug
    say("KV cache: %d pages of %d tokens (%.1f MiB, %s)%s", num_pages, cache.page_size,
        num_pages * shape.bytes_per_page / 2**20, str(kv_dtype).replace("torch.", ""),
        f" + {' and '.join(pools)} pools for {seats} requests ({pool_bytes(seats) / 2**20:.1f} MiB)" if pools else "")
    return KVSetup(kv, num_pages, seats)
