"""KV append: scatter the new tokens' K/V into their pages, and keep what page selection scores:
per-logical-page key min/max, or per-token key labels (r chosen channels of each key).

Without statistics, programs take blocks of tokens (and write the labels, if any). With
statistics, a program takes one *segment*: the new tokens of one sequence that fall in one
logical page (consecutive slots). It writes them, reduces their keys to channel-wise min/max,
and either starts the logical page's statistics afresh (the segment holds the page's first
token: whatever was there belonged to an earlier owner) or merges into them. Segments are planned once per step (`plan_segments`).

An FP8 cache (with scale tensors) takes each token's K and V rows quantized (`ops.fp8`); the
statistics and labels are taken from the unquantized keys.
Reference: `ops.reference.kv_append_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lserve.ops.fp8 import quantize_rows
from lserve.ops.launch import pdl_args, pdl_enter
from lserve.ops.paged_inputs import check_kv_scales, check_label_scale


@dataclass(frozen=True)
class AppendSegments:
    """Runs of new tokens inside one logical page each (int32, on the tokens' device; with
    `single`, placeholders that are never read)."""

    start: torch.Tensor
    """(S,) index of the run's first token in the step's flat batch."""
    length: torch.Tensor
    """(S,) tokens in the run (1..logical_page_size)."""
    num_segments: int
    single: bool = False
    """Every run is one token and run i is token i (a pure decode step): `start` and `length`
    are not read, and the kernel takes its token straight from its program id."""


def plan_segments(slots: torch.Tensor, logical_page_size: int, all_single: bool = False) -> AppendSegments:
    """Split the step's slots (T,) into runs within one logical page (once per step, not per layer).

    `all_single` (every sequence adds one token, a pure decode step) skips the device search.
    """
    t = slots.shape[0]
    if all_single or t <= 1:
        return AppendSegments(slots, slots, t, single=True)  # (start and length unread)
    logical = slots // logical_page_size
    breaks = (logical[1:] != logical[:-1]) | (slots[1:] != slots[:-1] + 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=slots.device), torch.nonzero(breaks)[:, 0] + 1])
    ends = torch.cat([starts[1:], torch.tensor([t], device=slots.device)])
    return AppendSegments(starts.to(torch.int32), (ends - starts).to(torch.int32), int(starts.shape[0]))


@triton.jit
def _store_kv(kc_ptr, vc_ptr, ks_ptr, vs_ptr, dst, scale_dst, k, v, mask, row_mask, QUANT: tl.constexpr,
              AXIS: tl.constexpr):
    """Store K/V rows at `dst`; an FP8 cache takes them quantized, their scales at `scale_dst`."""
    if QUANT:
        kq, k_scale = quantize_rows(k.to(tl.float32), AXIS)
        vq, v_scale = quantize_rows(v.to(tl.float32), AXIS)
        tl.store(kc_ptr + dst, kq, mask=mask)
        tl.store(vc_ptr + dst, vq, mask=mask)
        tl.store(ks_ptr + scale_dst, k_scale, mask=row_mask)
        tl.store(vs_ptr + scale_dst, v_scale, mask=row_mask)
    else:
        tl.store(kc_ptr + dst, k, mask=mask)
        tl.store(vc_ptr + dst, v, mask=mask)


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, map_ptr, label_ptr, chan_ptr, lscale_ptr, ks_ptr, vs_ptr,
    num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ct, stride_ch, stride_lh, stride_lsh, stride_sp, stride_sh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MAP: tl.constexpr, LABELS: tl.constexpr,
    LABEL_QUANT: tl.constexpr, QUANT: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_t = tl.program_id(0)
    head = tl.program_id(1)  # the cache's head
    src = head  # the head of k and v that this cache head stores
    if HAS_MAP:
        src = tl.load(map_ptr + head)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < num_tokens
    slots = tl.load(slot_ptr + rows, mask=valid, other=0).to(tl.int64)
    m = valid[:, None]
    k = tl.load(k_ptr + rows[:, None] * stride_kt + src * stride_kh + cols[None, :], mask=m)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + src * stride_vh + cols[None, :], mask=m)
    dst = slots[:, None] * stride_ct + head * stride_ch + cols[None, :]
    scale_dst = (slots // PAGE) * stride_sp + head * stride_sh + slots % PAGE
    _store_kv(kc_ptr, vc_ptr, ks_ptr, vs_ptr, dst, scale_dst, k, v, m, valid, QUANT, 1)
    if LABELS:
        # the key's label channels (a second, cached read of the same rows): (heads, slots, R) store
        c = tl.arange(0, LABELS)
        chans = tl.load(chan_ptr + head * LABELS + c)
        lab = tl.load(k_ptr + rows[:, None] * stride_kt + src * stride_kh + chans[None, :], mask=m)
        if LABEL_QUANT:  # FP8 labels: E4M3 with a scale per token over its r channels
            lab, lab_scale = quantize_rows(lab.to(tl.float32), 1)
            tl.store(lscale_ptr + head * stride_lsh + slots, lab_scale, mask=valid)
        tl.store(label_ptr + head * stride_lh + slots[:, None] * LABELS + c[None, :], lab, mask=m)


@triton.jit
def _store_page_stats(kmin_ptr, kmax_ptr, first_slot, head, lo, hi, cols, stride_sg, stride_sh, LOGICAL: tl.constexpr):
    """The key min/max (lo, hi: float32 over cols) of new tokens starting at `first_slot`, into
    their logical page's statistics: afresh when they include its first slot (what was there
    belonged to an earlier owner), else merged with what the page holds."""
    addr = (first_slot // LOGICAL) * stride_sg + head * stride_sh + cols
    if first_slot % LOGICAL != 0:  # the page already has keys: merge with them
        lo = tl.minimum(lo, tl.load(kmin_ptr + addr).to(tl.float32))
        hi = tl.maximum(hi, tl.load(kmax_ptr + addr).to(tl.float32))
    tl.store(kmin_ptr + addr, lo.to(kmin_ptr.dtype.element_ty))
    tl.store(kmax_ptr + addr, hi.to(kmax_ptr.dtype.element_ty))


@triton.jit
def _append_one_token(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, stats_head_ptr, ks_ptr, vs_ptr, t, head, src,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch, stride_sg, stride_sh, stride_scp, stride_sch,
    HEAD_DIM: tl.constexpr, LOGICAL: tl.constexpr, ALL_STATS: tl.constexpr, QUANT: tl.constexpr, PAGE: tl.constexpr,
):
    """Token t alone (a decode step): its slot and its K/V rows load side by side, then the
    statistics of its logical page start afresh (its first token) or take it in: two dependent
    loads in all, where a segment's run needs four (latency is this kernel's whole cost)."""
    cols = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + src * stride_kh + cols)
    v = tl.load(v_ptr + t * stride_vt + src * stride_vh + cols)
    dst = slot * stride_ct + head * stride_ch + cols
    scale_dst = (slot // PAGE) * stride_scp + head * stride_sch + slot % PAGE
    _store_kv(kc_ptr, vc_ptr, ks_ptr, vs_ptr, dst, scale_dst, k, v, None, None, QUANT, 0)
    flag = 1
    if not ALL_STATS:
        flag = tl.load(stats_head_ptr + head)
    if flag != 0:
        kf = k.to(tl.float32)
        _store_page_stats(kmin_ptr, kmax_ptr, slot, head, kf, kf, cols, stride_sg, stride_sh, LOGICAL)


@triton.jit
def _append_stats_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, seg_start_ptr, seg_len_ptr, stats_head_ptr,
    map_ptr, ks_ptr, vs_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ct, stride_ch, stride_sg, stride_sh, stride_scp, stride_sch,
    HEAD_DIM: tl.constexpr, LOGICAL: tl.constexpr, ALL_STATS: tl.constexpr, HAS_MAP: tl.constexpr,
    SINGLE: tl.constexpr, QUANT: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    seg = tl.program_id(0)
    head = tl.program_id(1)
    src = head  # the head of k and v that this cache head stores
    if HAS_MAP:
        src = tl.load(map_ptr + head)
    if SINGLE:
        _append_one_token(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, stats_head_ptr, ks_ptr, vs_ptr,
                          seg, head, src, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch,
                          stride_sg, stride_sh, stride_scp, stride_sch, HEAD_DIM, LOGICAL, ALL_STATS, QUANT, PAGE)
        return
    first = tl.load(seg_start_ptr + seg)
    n = tl.load(seg_len_ptr + seg)
    r = tl.arange(0, LOGICAL)
    cols = tl.arange(0, HEAD_DIM)
    valid = r < n
    rows = first + r
    slots = tl.load(slot_ptr + rows, mask=valid, other=0).to(tl.int64)
    m = valid[:, None]
    k = tl.load(k_ptr + rows[:, None] * stride_kt + src * stride_kh + cols[None, :], mask=m, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + src * stride_vh + cols[None, :], mask=m, other=0.0)
    dst = slots[:, None] * stride_ct + head * stride_ch + cols[None, :]
    scale_dst = (slots // PAGE) * stride_scp + head * stride_sch + slots % PAGE
    _store_kv(kc_ptr, vc_ptr, ks_ptr, vs_ptr, dst, scale_dst, k, v, m, valid, QUANT, 1)
    flag = 1
    if not ALL_STATS:
        flag = tl.load(stats_head_ptr + head)
    if flag != 0:
        kf = k.to(tl.float32)
        lo = tl.min(tl.where(m, kf, float("inf")), axis=0)
        hi = tl.max(tl.where(m, kf, float("-inf")), axis=0)
        first_slot = tl.load(slot_ptr + first).to(tl.int64)
        _store_page_stats(kmin_ptr, kmax_ptr, first_slot, head, lo, hi, cols, stride_sg, stride_sh, LOGICAL)


def kv_append(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_min: torch.Tensor | None = None,
    k_max: torch.Tensor | None = None,
    segments: AppendSegments | None = None,
    stats_heads: torch.Tensor | None = None,
    logical_page_size: int = 16,
    head_map: torch.Tensor | None = None,
    k_label: torch.Tensor | None = None,
    label_channels: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    label_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v (T, Hkv, D) into (num_pages, page_size, Hkv, D) caches at `slots` (T,) int64.

    FP8 caches take `k_scale`/`v_scale` (num_pages, Hkv, page_size) float32: each token's rows
    are stored quantized (`kv_cache.fp8`) with their scales.

    With `k_min`/`k_max` ((num_pages * page_size // logical_page_size, Hkv, D)) also keep key
    statistics for the heads flagged in `stats_heads` (Hkv,) (all heads when None). With
    `k_label` (Hkv, num_pages * page_size, r) and `label_channels` (Hkv, r) int32 instead, keep
    each new key's channels `label_channels[h]` at its slot (the channel scores' labels); FP8
    labels take `label_scale` (Hkv, num_pages * page_size) float32 for their per-token scales.
    A cache that holds some of the model's KV heads takes `head_map` (cache heads,) int64: the
    head of k and v (which then hold all of the model's KV heads) each cache head stores.
    """
    t, hkv, d = k.shape
    if v.shape != k.shape or slots.shape != (t,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slots {tuple(slots.shape)} disagree")
    if head_map is not None:
        if head_map.shape != (k_cache.shape[2],) or k_cache.shape[2] > hkv:
            raise ValueError(f"head map {tuple(head_map.shape)} does not fit cache {tuple(k_cache.shape)}")
        hkv = k_cache.shape[2]
    if k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not hold heads {hkv} x dim {d}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k, v need a contiguous last dim and the caches must be contiguous")
    ks, vs, *scale_strides = check_kv_scales(k_cache, k_scale, v_scale, slots)  # (per page, per head)
    quant = k_scale is not None
    if t == 0:
        return
    cache_strides = (k_cache.stride(1), k_cache.stride(2))  # per token, per head
    if (k_label is None) != (label_channels is None):
        raise ValueError("k_label and label_channels go together")
    if k_label is not None and label_channels is not None:
        r = label_channels.shape[1]
        if k_min is not None or k_max is not None:
            raise ValueError("a pool keeps key statistics or key labels, not both")
        if (label_channels.shape != (hkv, r) or label_channels.dtype != torch.int32 or r & (r - 1)
                or k_label.shape != (hkv, k_cache.shape[0] * k_cache.shape[1], r) or not k_label.is_contiguous()
                or not label_channels.is_contiguous()):
            raise ValueError(f"labels {tuple(k_label.shape)} with channels {tuple(label_channels.shape)} "
                             f"do not fit cache {tuple(k_cache.shape)}")
        check_label_scale(k_label, label_scale)
    if k_min is None or k_max is None:
        block_t = 16
        _append_kernel[(triton.cdiv(t, block_t), hkv)](
            k, v, slots, k_cache, v_cache, head_map if head_map is not None else slots,
            k_label if k_label is not None else slots, label_channels if label_channels is not None else slots,
            label_scale if label_scale is not None else slots, ks, vs, t,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache_strides,
            k_label.stride(0) if k_label is not None else 0, label_scale.stride(0) if label_scale is not None else 0,
            *scale_strides, HEAD_DIM=d, BLOCK_T=block_t, HAS_MAP=head_map is not None,
            LABELS=label_channels.shape[1] if label_channels is not None else 0,
            LABEL_QUANT=label_scale is not None, QUANT=quant, PAGE=k_cache.shape[1],
            **pdl_args(k.device),
        )
        return
    if k_min.shape != k_max.shape or k_min.shape[1:] != (hkv, d) or not k_min.is_contiguous():
        raise ValueError(f"statistics {tuple(k_min.shape)} do not match heads {hkv} x dim {d}")
    if k_cache.shape[1] % logical_page_size:
        raise ValueError(f"page size {k_cache.shape[1]} is not a multiple of {logical_page_size}")
    seg = segments if segments is not None else plan_segments(slots, logical_page_size)
    heads = stats_heads.to(torch.int8) if stats_heads is not None else seg.start  # (unread when ALL_STATS)
    _append_stats_kernel[(seg.num_segments, hkv)](
        k, v, slots, k_cache, v_cache, k_min, k_max, seg.start, seg.length, heads,
        head_map if head_map is not None else slots, ks, vs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache_strides, k_min.stride(0), k_min.stride(1),
        *scale_strides,
        HEAD_DIM=d, LOGICAL=logical_page_size, ALL_STATS=stats_heads is None, HAS_MAP=head_map is not None,
        SINGLE=seg.single, QUANT=quant, PAGE=k_cache.shape[1], **pdl_args(k.device),
    )
