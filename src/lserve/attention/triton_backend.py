"""Attention with lserve's Triton kernels: KV append, block-sparse prefill, split-K decode.

The default backend on CUDA. Per step, `prepare` plans the prefill query tiles once; every layer
then, per pool, appends its K/V (and key statistics), selects decode pages, and runs the decode
rows and the prefill rows of the flat batch.

Prefill rows over an FP8 pool read a model-dtype copy of the pages they need, made per layer
(`ops.fp8.dequantize_listed_pages`): on Hopper a tensor-core product takes its second operand
from shared memory, and tiles converted in registers inside the attention loop made the prefill
twice as slow; the copy costs one read of the FP8 pages and one write per layer and chunk.
Decode rows read FP8 tiles directly (memory-bound: the conversion is cheaper than the bytes).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lserve.attention.backend import AttentionBackend, PoolCall
from lserve.attention.metadata import AttentionMetadata
from lserve.ops.fp8 import dequantize_listed_pages
from lserve.ops.kv_append import AppendSegments, kv_append, plan_segments
from lserve.ops.page_scores import channel_page_scores, page_scores, store_top_pages
from lserve.ops.paged_inputs import StoredSelection
from lserve.ops.sparse_decode import sparse_decode
from lserve.ops.sparse_prefill import PrefillTiles, plan_tiles, sparse_prefill

# Tuned on an H200 (benchmarks/attention_kernels.py --sweep, head dim 128, bf16): on Hopper the
# prefill reads K/V pages through tensor descriptors (the bulk copy engine), one page per KV tile;
# older GPUs gather rows with ordinary loads. The CPU interpreter keeps the defaults.
HOPPER_PREFILL = dict(block_n=64, num_warps=4, num_stages=2, use_tma=True)
GPU_PREFILL = dict(block_n=128, num_warps=8, num_stages=2)
GPU_DECODE = dict(block_n=128, num_warps=4, num_stages=3)


@functools.cache
def prefill_config(device: torch.device, page_size: int) -> dict:
    """The prefill kernel's tiling for pages of `page_size` tokens on `device`. A tensor-descriptor
    tile is one page, so pages shorter than its tuned tile (16 or 32 tokens) gather rows into
    wider tiles instead."""
    if device.type != "cuda":
        return {}
    if torch.cuda.get_device_capability(device)[0] >= 9 and page_size >= HOPPER_PREFILL["block_n"]:
        return HOPPER_PREFILL
    return GPU_PREFILL


def prefill_block_m(device: torch.device) -> int:
    """Query rows per prefill tile."""
    return 128 if device.type == "cuda" else 16


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    _tiles: PrefillTiles | None = None
    _segments: AppendSegments | None = None
    _staging: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] | None = None
    _side: torch.cuda.Stream | None = None
    pool_streams: bool = True
    """Run a layer's ring pool on a side stream beside its paged pool in pure decode steps (GPU)."""

    def prepare(self, md: AttentionMetadata) -> None:
        super().prepare(md)
        self._segments = None  # the paged pool's append segments, planned by the first layer
        self._staging = {}  # FP8 prefill: which pages each pool's prefill rows read, planned once
        device = md.seq_lens.device
        prefill_lens = list(md.query_lens_cpu[md.num_decodes :])
        # (a pure decode step has no prefill tiles: no copy to the device that would wait for it)
        self._tiles = plan_tiles(prefill_lens, prefill_block_m(device), device, first_seq=md.num_decodes) \
            if prefill_lens else None

    def prepare_for_capture(self, md: AttentionMetadata, mode: str) -> None:
        super().prepare_for_capture(md, mode)
        self._segments = None
        self._tiles = None

    def _attend(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, md: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        self._attend_heads(call, q, k, v, layer, md, out)
        return out

    def _attend_pools(
        self, calls: list[PoolCall], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
        md: AttentionMetadata, out: torch.Tensor,
    ) -> None:
        """In a pure decode step on a GPU the streaming heads' ring (append, decode) runs on a side
        stream beside the dense heads' pool (append, selection, decode): each path is a chain of
        small kernels bound by latency, not bandwidth, so the two overlap almost fully (a captured
        graph keeps the fork and the join as parallel branches)."""
        if md.num_prefills or len(calls) < 2 or not q.is_cuda or not self.pool_streams:
            super()._attend_pools(calls, q, k, v, layer, md, out)
            return
        main = torch.cuda.current_stream(q.device)
        if self._side is None:
            self._side = torch.cuda.Stream(q.device)
        side = self._side
        # the ring's path allocates nothing that outlives it (no per-forward cache): what is made
        # on the side stream is used and freed there
        assert calls[0].ring, "the first pool of a layer is its ring"
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._attend_heads(calls[0], q, k, v, layer, md, out)
        for call in calls[1:]:
            self._attend_heads(call, q, k, v, layer, md, out)
        main.wait_stream(side)

    def _attend_heads(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, md: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """One pool's heads (all of the layer's, or one pool of several), with no copies: the
        kernels take q, k, v as strided views of the projection and, for one pool of several,
        reach the pool's heads through its head map; the results go straight into their rows of
        `out`. (In a pure decode step, the CUDA-graph case, every small kernel counts; gathering
        the heads cost a 128K prefill about 3% of its time.)"""
        self._write(call, k, v, md, head_map=call.kv_heads)
        nd = md.num_decodes
        if nd:
            lists = self._page_lists(call, q[:nd], layer, md, all_heads=call.kv_heads is not None)
            self._decode(call, q, md, lists, out=out)
        if md.num_prefills:
            self._prefill(call, q, k, v, md, out)

    def _write(
        self, call: PoolCall, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
        head_map: torch.Tensor | None = None,
    ) -> None:
        logical = self.cache.paged.logical_page_size or 16
        segments = None
        if call.k_min is not None:
            # statistics work on runs of slots inside one logical page; a pure decode step has one
            # token per sequence (no search, nothing read back: safe inside a CUDA graph)
            if md.num_decodes == md.num_seqs:
                segments = plan_segments(call.slot_mapping, logical, all_single=True)
            else:
                if self._segments is None:
                    self._segments = plan_segments(call.slot_mapping, logical)
                segments = self._segments
        kv_append(k, v, call.slot_mapping, call.k_cache, call.v_cache, call.k_min, call.k_max,
                  segments=segments, logical_page_size=logical, head_map=head_map, k_label=call.k_label,
                  label_channels=call.label_channels, label_scale=call.label_scale, k_scale=call.k_scale,
                  v_scale=call.v_scale)

    def _page_scores(
        self, call: PoolCall, q: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
        kv_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert self.selector is not None
        aggregate, group = self.selector.aggregate, self._group if kv_heads is not None else None
        if call.k_label is not None and call.label_channels is not None:
            return channel_page_scores(q, call.k_label, call.label_channels, page_table, seq_lens, page_size,
                                       aggregate, kv_head_map=kv_heads, group=group,
                                       mass=self.selector.score == "rope_mass", label_scale=call.label_scale)
        logical = self.cache.paged.logical_page_size
        assert logical is not None and call.k_min is not None and call.k_max is not None
        return page_scores(q, call.k_min, call.k_max, page_table, seq_lens, page_size, logical, aggregate,
                           kv_head_map=kv_heads, group=group, midrange=self.selector.score == "midrange")

    def _selection(self, layer: int, nd: int, scores_fn) -> StoredSelection | None:
        # one kernel selects into the selector's store, and the decode kernel reads the store and
        # plan directly: no page lists to build
        assert self.selector is not None
        return self.selector.update(layer, nd, scores_fn, store_top_pages)

    def _decode(
        self, call: PoolCall, q: torch.Tensor, md: AttentionMetadata,
        lists: tuple[torch.Tensor, torch.Tensor] | StoredSelection | None, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode rows of one pool. With `out`, q and out hold all of the model's heads and the
        pool's heads are reached through `call.kv_heads`."""
        nd = md.num_decodes
        sink, local = self.windows(call, decode=True)
        mapped = out is not None and call.kv_heads is not None
        return sparse_decode(
            q[:nd], call.k_cache, call.v_cache, call.page_table[:nd], md.seq_lens[:nd],
            self.scale, streaming_heads=call.streaming, sink=sink, local=local,
            page_list=lists[0] if isinstance(lists, tuple) else None,
            page_list_len=lists[1] if isinstance(lists, tuple) else None,
            selection=lists if isinstance(lists, StoredSelection) else None,
            max_seq_len=self._split_len(call, md, lists), kv_head_map=call.kv_heads if mapped else None,
            out=out[:nd] if out is not None else None, group=self._group if mapped else None,
            k_scale=call.k_scale, v_scale=call.v_scale, **(GPU_DECODE if q.is_cuda else {}),
        )

    def _split_len(
        self, call: PoolCall, md: AttentionMetadata, lists: tuple[torch.Tensor, torch.Tensor] | StoredSelection | None
    ) -> int:
        """The longest key range a decode program list can walk: what the split count is chosen
        for. Host-only values (the same at capture and replay): a ring reads at most its window,
        a page list at most its width."""
        longest = self.decode_split_len or max(md.seq_lens_cpu[: md.num_decodes])
        if call.ring:
            sink, local = self.windows(call, decode=True)
            return min(longest, sink + local)
        if isinstance(lists, StoredSelection):
            return min(longest, lists.width * md.page_size)
        if lists is not None:
            return min(longest, lists[0].shape[2] * md.page_size)
        return longest

    def _prefill(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        assert self._tiles is not None, "prepare() was not called for this step"
        sink, local = self.windows(call, decode=False)
        k_cache, v_cache, table = call.k_cache, call.v_cache, call.page_table
        if call.k_scale is not None and call.v_scale is not None:
            k_cache, v_cache, table = self._staged_pages(call, md, q.dtype, sink, local)
        mapped = call.kv_heads is not None  # q and out hold every head of the model
        sparse_prefill(
            q, k_cache, v_cache, table, md.seq_lens, md.query_start_loc,
            self._tiles, self.scale, streaming_heads=call.streaming, sink=sink, local=local, out=out,
            kv_head_map=call.kv_heads if mapped else None, group=self._group if mapped else None,
            **prefill_config(q.device, k_cache.shape[1]),
        )

    def _staged_pages(
        self, call: PoolCall, md: AttentionMetadata, dtype: torch.dtype, sink: int, local: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A model-dtype copy of the FP8 pages this layer's prefill rows read, and the page table
        that addresses it: (K pages, V pages, table). Page 0 of the copy is zeros: the table's
        entries for pages nobody reads point there, so a tile that spans one reads finite values
        (masked anyway)."""
        assert self._staging is not None and call.k_scale is not None and call.v_scale is not None
        windowed = call.ring or call.window is not None
        key = (call.page_table.data_ptr(), windowed)
        if key not in self._staging:
            self._staging[key] = _plan_staging(md, call.page_table.shape[1], windowed, sink, local)
        pairs, table, num_pages = self._staging[key]
        out_k = torch.empty((num_pages, *call.k_cache.shape[1:]), dtype=dtype, device=call.k_cache.device)
        out_v = torch.empty_like(out_k)
        out_k[0].zero_()
        out_v[0].zero_()
        dequantize_listed_pages(call.k_cache, call.v_cache, call.k_scale, call.v_scale, call.page_table, pairs,
                                out_k, out_v)
        return out_k, out_v, table


def _plan_staging(
    md: AttentionMetadata, width: int, windowed: bool, sink: int, local: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Which logical pages of each prefill row its queries read (every page up to its length; a
    streaming head or a sliding window only its sink pages and the window of its first query),
    numbered from 1 in a staging copy: ((n, 3) int32 (row, logical page, copy page), the copy's
    page table (rows, width) int32, pages in the copy)."""
    page = md.page_size
    pairs: list[tuple[int, int, int]] = []
    table = np.zeros((md.num_seqs, width), dtype=np.int32)
    for row in range(md.num_decodes, md.num_seqs):
        seq_len, q_len = md.seq_lens_cpu[row], md.query_lens_cpu[row]
        n = -(-seq_len // page)
        needed: list[int] | range = range(n)
        if windowed:
            head = min(-(-sink // page), n)
            first = max(seq_len - q_len - local + 1, 0) // page
            needed = [*range(head), *range(max(first, head), n)]
        for j in needed:
            pairs.append((row, j, len(pairs) + 1))
            table[row, j] = len(pairs)
    device = md.seq_lens.device
    flat = torch.tensor(pairs, dtype=torch.int32).view(-1, 3)
    return flat.to(device), torch.from_numpy(table).to(device), len(pairs) + 1
