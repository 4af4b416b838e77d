"""Block-sparse paged decode: one new query per sequence, a list of KV pages per (sequence, KV head).

A program owns one (sequence, KV head, split). It walks a *virtual* key range in tiles of
BLOCK_N keys and maps each virtual key to a token position, then through the page table to a
slot, so any page size from 16 to 128 works with the same tile:
- dense heads: every position 0..seq_len-1;
- dense heads with a page list (dynamic sparsity): the listed pages (logical indices into the
  page table), page after page, positions past seq_len masked;
- streaming heads: the sink tokens, then the local window (the exact Λ set, no masking needed).
All query heads of the GQA group are rows of one tile, so each page is read once per group.
An FP8 cache's tiles are converted in registers and their per-token scales applied to the scores
(K) and to the probabilities (V): powers of two, so exactly as if the tiles were dequantized.
Long ranges are split across programs (split-K); `merge_states` combines the partial results.
Reference: `ops.reference.sparse_decode_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.ops.merge_states import merge_states
from lserve.ops.paged_inputs import (
    PlanRow,
    StoredSelection,
    check_kv_scales,
    check_paged_attention,
    pack_sparse_args,
)

# the page selector's plan rows (`StoredSelection.plan`), as Triton kernels can read module constants
PLAN_FITS = tl.constexpr(int(PlanRow.FITS))
PLAN_NUM_PAGES = tl.constexpr(int(PlanRow.NUM_PAGES))
PLAN_ANCHOR = tl.constexpr(int(PlanRow.ANCHOR))
PLAN_SEAT = tl.constexpr(int(PlanRow.SEAT))


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, page_table_ptr, seq_lens_ptr, stream_ptr, list_ptr, list_len_ptr, map_ptr,
    out_ptr, lse_ptr, dst_ptr, counts_ptr, ks_ptr, vs_ptr,
    sink, local, qk_scale, keep, stride_cnt,
    stride_qb, stride_qh,
    stride_cp, stride_ct, stride_ch, stride_sp, stride_sh,
    stride_pt_b, stride_list_b, stride_list_h, stride_len_b,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_db, stride_dh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_LIST: tl.constexpr, HAS_STREAM: tl.constexpr,
    HAS_MAP: tl.constexpr, STORED: tl.constexpr, VAR_KEEP: tl.constexpr, QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)  # the cache's head
    split = tl.program_id(2)
    src = kvh  # the model's KV head, whose query heads are rows of q and of the output
    if HAS_MAP:
        src = tl.load(map_ptr + kvh)
    seq_len = tl.load(seq_lens_ptr + b)
    is_stream = False
    if HAS_STREAM:
        is_stream = tl.load(stream_ptr + kvh) != 0
    sink_len = tl.minimum(sink, seq_len)
    local_start = tl.maximum(sink_len, seq_len - local)
    n_list = 0
    fits = 0
    anchor = 0
    n_stored = 0
    list_row = list_ptr
    if STORED:
        # the page selector's own buffers (`StoredSelection`): list_ptr is its store, list_len_ptr
        # its plan; a row that fits reads every page, else its stored pages, then anchor..last
        fits = tl.load(list_len_ptr + PLAN_FITS * stride_len_b + b)
        pages = tl.load(list_len_ptr + PLAN_NUM_PAGES * stride_len_b + b).to(tl.int32)
        anchor = tl.load(list_len_ptr + PLAN_ANCHOR * stride_len_b + b).to(tl.int32)
        seat = tl.load(list_len_ptr + PLAN_SEAT * stride_len_b + b)
        n_keep = keep
        if VAR_KEEP:  # a top-p selection: each (seat, head) keeps its own number of stored pages
            n_keep = tl.load(counts_ptr + seat * stride_cnt + kvh)
        n_list = tl.where(fits != 0, pages, n_keep + pages - anchor)
        n_stored = tl.where(fits != 0, 0, n_keep)
        list_row = list_ptr + seat * stride_list_b + kvh * stride_list_h
    elif HAS_LIST:
        n_list = tl.load(list_len_ptr + b * stride_len_b + kvh)
        list_row = list_ptr + b * stride_list_b + kvh * stride_list_h
    if is_stream:
        virtual_len = sink_len + seq_len - local_start
    elif HAS_LIST or STORED:
        virtual_len = n_list * PAGE_SIZE
    else:
        virtual_len = seq_len
    chunk = tl.cdiv(tl.cdiv(virtual_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(virtual_len, start + chunk)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = src * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        vpos = n0 + tl.arange(0, BLOCK_N)
        valid = vpos < end
        if is_stream:
            pos = tl.where(vpos < sink_len, vpos, local_start + vpos - sink_len)
        elif STORED:
            idx = vpos // PAGE_SIZE
            # the first n_stored entries come from the store (none when the row fits); the mask is
            # a block compare only (a scalar flag in it breaks some Triton interpreters)
            from_store = idx < n_stored
            stored = tl.load(list_row + idx, mask=valid & from_store, other=0)
            lp = tl.where(from_store, stored, tl.where(fits != 0, idx, anchor + idx - n_stored))
            pos = lp * PAGE_SIZE + vpos % PAGE_SIZE
            valid = valid & (pos < seq_len)
        elif HAS_LIST:
            lp = tl.load(list_row + vpos // PAGE_SIZE, mask=valid, other=0)
            pos = lp * PAGE_SIZE + vpos % PAGE_SIZE
            valid = valid & (pos < seq_len)
        else:
            pos = vpos
        page = tl.load(page_table_ptr + b * stride_pt_b + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        addr = page * stride_cp + (pos % PAGE_SIZE) * stride_ct + kvh * stride_ch
        k = tl.load(kc_ptr + addr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if QUANT:
            s_addr = page * stride_sp + kvh * stride_sh + pos % PAGE_SIZE
            k_scale = tl.load(ks_ptr + s_addr, mask=valid, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * (k_scale * qk_scale)[None, :]
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + addr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if QUANT:
            v_scale = tl.load(vs_ptr + s_addr, mask=valid, other=0.0)
            acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(q.dtype), v.to(q.dtype))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    gm = g < GROUP
    if NUM_SPLITS == 1:  # the final result: straight into the destination, no merge pass
        d_rows = b * stride_db + heads * stride_dh
        tl.store(dst_ptr + d_rows[:, None] + d[None, :], out.to(dst_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        # natural-log LSE of the split (scores were scaled by log2(e)); partial rows by cache head
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        p_heads = kvh * GROUP + g
        o_rows = b * stride_ob + p_heads * stride_oh + split * stride_os
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out, mask=gm[:, None])
        tl.store(lse_ptr + b * stride_lb + p_heads * stride_lh + split, lse, mask=gm)


def choose_num_splits(batch: int, num_kv_heads: int, max_virtual_len: int, num_sms: int = 132,
                      min_keys_per_split: int = 128) -> int:
    """Enough programs to fill the GPU twice over, without splits shorter than `min_keys_per_split`.

    Short key ranges (a streaming head's window, a page list) are bound by the latency of the
    chained loads (list -> page table -> K/V), not by bandwidth: one tile per program and a merge
    beat a few programs walking many tiles (`benchmarks/decode_layer_parts.py`, docs/benchmarks.md)."""
    by_work = max(1, max_virtual_len // min_keys_per_split)
    by_occupancy = max(1, triton.cdiv(2 * num_sms, batch * num_kv_heads))
    return int(min(by_work, by_occupancy, 256))


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    streaming_heads: torch.Tensor | None = None,
    sink: int = 0,
    local: int = 0,
    page_list: torch.Tensor | None = None,
    page_list_len: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_head_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    group: int | None = None,
    selection: StoredSelection | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, Hq, D) -> (B, Hq, D): attention of each sequence's last token over its selected keys.

    page_table (B, max_pages) int32; seq_lens (B,) int32 (tokens including the new one, already
    appended); streaming_heads (Hkv,) bool/int8 or None; page_list (B, Hkv, max_list) int32 logical
    page indices with page_list_len (B, Hkv), for dense heads, or None for every page.

    A cache that holds some of the model's KV heads (one pool of several) takes `kv_head_map`
    (Hkv,) int64: the model KV head of each cache head. q then holds all of the model's query heads
    and the result goes into those heads' rows of `out` (B, Hq, D), the other rows left as they
    are; no gather or scatter copies. `group` (query heads per KV head) goes with the map. `out`
    may also be given without a map.

    `selection` (instead of page_list) reads the page selector's store and plan directly: the
    same pages as `PageSelector.select`'s lists, without building them.

    An FP8 cache takes its scales `k_scale`/`v_scale` (num_pages, Hkv, page_size) float32.
    """
    if selection is not None and page_list is not None:
        raise ValueError("give page_list or selection, not both")
    bsz, hq, d = q.shape
    if kv_head_map is not None:
        hkv = k_cache.shape[2]
        if out is None or group is None or kv_head_map.shape != (hkv,) or hkv * group > hq:
            raise ValueError("kv_head_map needs `out`, `group` and one entry per cache head")
        page_size, _ = check_paged_attention(q[:, : hkv * group], k_cache, v_cache, page_table, page_list, page_list_len)
    else:
        page_size, hkv = check_paged_attention(q, k_cache, v_cache, page_table, page_list, page_list_len)
        group = hq // hkv
    if out is not None and (out.shape != q.shape or out.stride(-1) != 1):
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)}")
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else int(seq_lens.max().item())
        num_splits = choose_num_splits(bsz, hkv, longest, _num_sms(q.device))
    dst = out if out is not None else torch.empty_like(q)
    heads = hkv * group  # query heads served by this cache
    if num_splits > 1:
        part = torch.empty((bsz, heads, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((bsz, heads, num_splits), dtype=torch.float32, device=q.device)
    else:  # written straight into dst; the partial buffers are not touched
        part, lse = dst.unsqueeze(2), dst
    stream, lst, lst_len = pack_sparse_args(q.device, streaming_heads, page_list, page_list_len)
    ks, vs, stride_sp, stride_sh = check_kv_scales(k_cache, k_scale, v_scale, seq_lens)
    keep = 0
    counts = lst_len
    if selection is not None:
        if selection.store.shape[1] != hkv:
            raise ValueError(f"selection store {tuple(selection.store.shape)} does not hold {hkv} heads")
        lst, lst_len, keep = selection.store, selection.plan, selection.keep
        if selection.counts is not None:
            counts = selection.counts
    _decode_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, stream, lst, lst_len,
        kv_head_map if kv_head_map is not None else seq_lens, part, lse, dst, counts, ks, vs,
        sink, local, scale * 1.4426950408889634, keep, counts.stride(0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), stride_sp, stride_sh,
        page_table.stride(0), lst.stride(0), lst.stride(1), lst_len.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), dst.stride(0), dst.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, PAGE_SIZE=page_size,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, HAS_LIST=page_list is not None,
        HAS_STREAM=streaming_heads is not None, HAS_MAP=kv_head_map is not None, STORED=selection is not None,
        VAR_KEEP=selection is not None and selection.counts is not None, QUANT=k_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        merge_states(part, lse, q.dtype, out=dst, head_map=kv_head_map, group=group)
    return dst


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
