"""Query-aware page scores for dynamic sparsity (`lserve.sparse.selection` says which is used).

Statistics scores (`page_scores`): for a decode query q and a logical page with channel-wise key
bounds kmin, kmax, Quest's bound, the largest possible q.k in the page, is
sum_c max(q_c kmax_c, q_c kmin_c) = max(q, 0).kmax + min(q, 0).kmin, two small matmuls with
float32 accumulation; the midrange score is q.(kmin + kmax)/2. A physical page scores the max
over its logical pages; logical pages that start past the sequence are ignored (their statistics
belong to nobody yet). The query heads of a GQA group share one selection: their scores are
aggregated by max (this function's default) or sum (the engine's).
Reference: `ops.reference.page_scores_ref`.

Channel scores (`channel_page_scores`): the exact partial product q_C . k_C of each token on a
few key channels C per head (labels kept per token by the KV append), max over the page's
tokens; or (rope_mass) a log-sum-exp of the group's heads' partial logits over the page's
tokens. Reference: `ops.reference.channel_page_scores_ref`.

`store_top_pages` then writes each re-selecting row's best pages into the page selector's store
(reference: `ops.reference.store_top_pages_ref`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.ops.launch import pdl_args, pdl_enter
from lserve.ops.paged_inputs import PLAN_ROWS, PlanRow, TopP, check_label_scale

# the selector's plan rows, as Triton kernels can read module constants
PLAN_RECOMPUTE = tl.constexpr(int(PlanRow.RECOMPUTE))
PLAN_ANCHOR = tl.constexpr(int(PlanRow.ANCHOR))
PLAN_SEAT = tl.constexpr(int(PlanRow.SEAT))


@triton.jit
def _page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, page_table_ptr, seq_lens_ptr, map_ptr, out_ptr, width,
    stride_qb, stride_qh, stride_sg, stride_sh, stride_pt_b, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    LOGICAL: tl.constexpr, BLOCK_P: tl.constexpr, USE_SUM: tl.constexpr, HAS_MAP: tl.constexpr,
    IEEE: tl.constexpr, MIDRANGE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)  # the statistics' head
    pblock = tl.program_id(2)
    src = kvh  # the model's KV head, whose query heads are rows of q
    if HAS_MAP:
        src = tl.load(map_ptr + kvh)
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, PAGE_SIZE)
    p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < num_pages
    out_row = out_ptr + b * stride_ob + kvh * stride_oh
    if pblock * BLOCK_P >= num_pages:
        # past the sequence (the grid covers the widest table): -inf, so the output needs no fill
        tl.store(out_row + p, tl.full([BLOCK_P], float("-inf"), tl.float32), mask=p < width)
        return
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + (src * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None], other=0.0)
    # sum_c max(q_c kmax_c, q_c kmin_c) = max(q, 0) . kmax + min(q, 0) . kmin: two small matmuls
    # over the GQA group's rows (padded to 16). Products of two bf16/fp16 values are exact in the
    # float32 accumulator; float32 inputs use IEEE products (TF32 could reorder close pages).
    # The midrange score q.(kmin + kmax)/2 takes the same two products with q/2 on both sides
    # (halving is exact).
    if MIDRANGE:
        q_pos = (q * 0.5).to(kmax_ptr.dtype.element_ty)
        q_neg = q_pos
    else:
        q_pos = tl.maximum(q, 0.0).to(kmax_ptr.dtype.element_ty)  # (the scalar 0.0 promotes to float32)
        q_neg = tl.minimum(q, 0.0).to(kmax_ptr.dtype.element_ty)
    page = tl.load(page_table_ptr + b * stride_pt_b + p, mask=p_ok, other=0).to(tl.int64)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for sub in tl.static_range(PAGE_SIZE // LOGICAL):
        ok = p_ok & (p * PAGE_SIZE + sub * LOGICAL < seq_len)
        row = page * (PAGE_SIZE // LOGICAL) + sub
        addr = row[:, None] * stride_sg + kvh * stride_sh + d[None, :]
        kmax = tl.load(kmax_ptr + addr, mask=ok[:, None], other=0.0)
        kmin = tl.load(kmin_ptr + addr, mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee")
            s += tl.dot(q_neg, tl.trans(kmin), input_precision="ieee")
        else:
            s = tl.dot(q_pos, tl.trans(kmax)) + tl.dot(q_neg, tl.trans(kmin))  # (GROUP_PAD, BLOCK_P)
        if USE_SUM:
            agg = tl.sum(s, axis=0)  # padded rows are 0
        else:
            agg = tl.max(tl.where(g_ok[:, None], s, float("-inf")), axis=0)
        best = tl.maximum(best, tl.where(ok, agg, float("-inf")))
    tl.store(out_row + p, best, mask=p < width)


def page_scores(
    q: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    logical_page_size: int,
    aggregate: str = "max",
    kv_head_map: torch.Tensor | None = None,
    group: int | None = None,
    block_p: int = 64,
    num_warps: int = 4,
    midrange: bool = False,
) -> torch.Tensor:
    """q (B, Hq, D); statistics (num_pages * page_size // logical, Hkv, D); page_table (B, P) int32;
    seq_lens (B,) int32 -> scores (B, Hkv, P) float32, -inf for pages past each sequence.
    Quest's bound, or with `midrange` q.(kmin + kmax)/2.

    Statistics that hold some of the model's KV heads (one pool of several) take `kv_head_map`
    (Hkv,) int64, the model KV head of each statistics head, and `group` (query heads per KV
    head); q then holds all of the model's query heads. q may be any view with a unit last
    stride (the projection's output needs no copy).
    """
    bsz, hq, d = q.shape
    hkv = k_min.shape[1]
    if aggregate not in ("max", "sum"):
        raise ValueError(f"aggregate must be 'max' or 'sum', got {aggregate!r}")
    if kv_head_map is not None and (kv_head_map.shape != (hkv,) or group is None or hkv * group > hq):
        raise ValueError("kv_head_map needs `group` and one entry per statistics head")
    if (kv_head_map is None and hq % hkv) or k_min.shape != k_max.shape or k_min.shape[2] != d \
            or not k_min.is_contiguous() or not k_max.is_contiguous():
        raise ValueError(f"q {tuple(q.shape)} does not fit statistics {tuple(k_min.shape)}")
    if page_size % logical_page_size:
        raise ValueError(f"page size {page_size} is not a multiple of {logical_page_size}")
    if q.dtype != k_min.dtype:
        q = q.to(k_min.dtype)  # the matmul takes one input type (the engine's are the same)
    if q.stride(2) != 1:
        q = q.contiguous()
    if kv_head_map is None:
        group = hq // hkv
    max_pages = page_table.shape[1]
    out = torch.empty((bsz, hkv, max_pages), dtype=torch.float32, device=q.device)
    _page_scores_kernel[(bsz, hkv, triton.cdiv(max_pages, block_p))](
        q, k_min, k_max, page_table, seq_lens, kv_head_map if kv_head_map is not None else seq_lens, out, max_pages,
        q.stride(0), q.stride(1), k_min.stride(0), k_min.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, PAGE_SIZE=page_size,
        LOGICAL=logical_page_size, BLOCK_P=block_p, USE_SUM=aggregate == "sum", HAS_MAP=kv_head_map is not None,
        IEEE=k_min.dtype == torch.float32, MIDRANGE=midrange, num_warps=num_warps, **pdl_args(q.device),
    )
    return out


@triton.jit
def _mass_scores(q_head, stride_qh, label_head, scale_head, chan_ptr, page_table_row, seq_len, pblock, out_row, width,
                 GROUP: tl.constexpr, GP: tl.constexpr, PACK: tl.constexpr, NCOL: tl.constexpr, R: tl.constexpr,
                 R_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, IEEE: tl.constexpr,
                 LABEL_QUANT: tl.constexpr):
    """rope_mass of a block of pages, stored: log sum over the group's heads g and the pages'
    tokens t of exp(q_gC . k_tC / tau_g), tau_g = sqrt(D |q_gC|_1 / |q_g|_1) (SparQ's
    temperature, from the head's full query row). Every head's partial logits come from one
    tensor-core matmul, whose output needs 16 columns while a group has fewer heads: so the
    block's tokens are cut into PACK sub-blocks side by side, the labels tile is (token in
    sub-block, (sub-block, channel)) and the queries' is block-diagonal ((sub-block, channel),
    (sub-block, head)), and the NCOL >= PACK * GP output columns are (sub-block, head) logits
    (then zero padding, dropped before the log-sum-exp, when a small block or a large page
    leaves too few sub-blocks to fill 16): the exponentials are not spent on padding.
    FP8 labels go into the product in the queries' dtype (exactly), and each token's partial
    logits are multiplied by its scale (a power of two: exact too)."""
    SUB: tl.constexpr = BLOCK_P * PAGE_SIZE // PACK  # tokens of a sub-block (whole pages)
    SUB_P: tl.constexpr = SUB // PAGE_SIZE
    i = tl.arange(0, SUB)
    j = tl.arange(0, PACK)
    c = tl.arange(0, R_PAD)
    tok = pblock * BLOCK_P * PAGE_SIZE + j[None, :] * SUB + i[:, None]  # (SUB, PACK)
    ok = tok < seq_len
    slot = tl.load(page_table_row + tok // PAGE_SIZE, mask=ok, other=0).to(tl.int64) * PAGE_SIZE + tok % PAGE_SIZE
    c_ok = c < R
    lab = tl.load(label_head + (slot * R)[:, :, None] + c[None, None, :], mask=ok[:, :, None] & c_ok[None, None, :],
                  other=0.0)  # (SUB, PACK, R_PAD), the store's dtype
    lab = tl.reshape(lab, (SUB, PACK * R_PAD))
    if LABEL_QUANT:
        lab = lab.to(q_head.dtype.element_ty)
    chans = tl.load(chan_ptr + c, mask=c_ok, other=0)
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    qc = tl.load(q_head + g[:, None] * stride_qh + chans[None, :], mask=g_ok[:, None] & c_ok[None, :], other=0.0)
    d = tl.arange(0, HEAD_DIM)
    l1 = tl.sum(tl.abs(tl.load(q_head + g[:, None] * stride_qh + d[None, :], mask=g_ok[:, None],
                               other=0.0).to(tl.float32)), axis=1)
    tau = tl.maximum(tl.sqrt(HEAD_DIM * tl.sum(tl.abs(qc.to(tl.float32)), axis=1) / tl.maximum(l1, 1e-30)), 1e-20)
    inv = tl.where(g_ok, 1.4426950408889634 / tau, 0.0)  # log2(e) / tau_g: base-2 logits
    # block-diagonal queries ((sub-block, channel), (pad, sub-block, head)): (PACK, R_PAD, REP, PACK, GP)
    REP: tl.constexpr = NCOL // (PACK * GP)
    rep = tl.arange(0, REP)
    diag = (j[:, None, None, None, None] == j[None, None, None, :, None]) & (rep == 0)[None, None, :, None, None]
    qb = tl.where(diag, tl.trans(qc)[None, :, None, None, :], 0.0)
    qb = tl.reshape(qb.to(lab.dtype), (PACK * R_PAD, NCOL))
    if IEEE:
        s = tl.dot(lab, qb, input_precision="ieee")
    else:
        s = tl.dot(lab, qb)  # (the model's bf16/fp16 queries: exact in the label dtype)
    s = tl.sum(tl.where((rep == 0)[None, :, None], tl.reshape(s, (SUB, REP, PACK * GP)), 0.0), axis=1)  # (exact)
    s = tl.reshape(s, (SUB, PACK, GP))
    if LABEL_QUANT:
        s = s * tl.load(scale_head + slot, mask=ok, other=0.0)[:, :, None]
    s = tl.where(ok[:, :, None] & g_ok[None, None, :], s * inv[None, None, :], float("-inf"))
    s = tl.reshape(s, (SUB_P, PAGE_SIZE, PACK, GP))  # (page of a sub-block, token, sub-block, head)
    m = tl.max(tl.max(s, axis=3), axis=1)  # (SUB_P, PACK)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.sum(tl.sum(tl.exp2(s - m_safe[:, None, :, None]), axis=3), axis=1)
    best = tl.where(acc > 0, (m + tl.log2(tl.where(acc > 0, acc, 1.0))) * 0.6931471805599453, float("-inf"))
    p = pblock * BLOCK_P + j[None, :] * SUB_P + tl.arange(0, SUB_P)[:, None]
    tl.store(out_row + p, best, mask=p < width)


@triton.jit
def _channel_scores_kernel(
    q_ptr, label_ptr, lscale_ptr, chan_ptr, page_table_ptr, seq_lens_ptr, map_ptr, out_ptr, width,
    stride_qb, stride_qh, stride_lh, stride_lsh, stride_pt_b, stride_ob, stride_oh,
    GROUP: tl.constexpr, R: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_SUM: tl.constexpr, HAS_MAP: tl.constexpr, MASS: tl.constexpr, HEAD_DIM: tl.constexpr,
    GP: tl.constexpr, PACK: tl.constexpr, NCOL: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
    LABEL_QUANT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)  # the labels' head
    pblock = tl.program_id(2)
    src = kvh  # the model's KV head, whose query heads are rows of q
    if HAS_MAP:
        src = tl.load(map_ptr + kvh)
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, PAGE_SIZE)
    p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < num_pages
    out_row = out_ptr + b * stride_ob + kvh * stride_oh
    if pblock * BLOCK_P >= num_pages:  # past the sequence: as in `_page_scores_kernel`
        tl.store(out_row + p, tl.full([BLOCK_P], float("-inf"), tl.float32), mask=p < width)
        return
    if MASS:
        _mass_scores(q_ptr + b * stride_qb + (src * GROUP) * stride_qh, stride_qh, label_ptr + kvh * stride_lh,
                     lscale_ptr + kvh * stride_lsh, chan_ptr + kvh * R, page_table_ptr + b * stride_pt_b, seq_len,
                     pblock, out_row, width, GROUP, GP, PACK, NCOL, R, R_PAD, HEAD_DIM, PAGE_SIZE, BLOCK_P, IEEE,
                     LABEL_QUANT)
        return
    c = tl.arange(0, R)
    chans = tl.load(chan_ptr + kvh * R + c)
    q_row = q_ptr + b * stride_qb + (src * GROUP) * stride_qh + chans
    t = tl.arange(0, PAGE_SIZE)
    page = tl.load(page_table_ptr + b * stride_pt_b + p, mask=p_ok, other=0).to(tl.int64)
    ok = p_ok[:, None] & (p[:, None] * PAGE_SIZE + t[None, :] < seq_len)  # (BLOCK_P, PAGE_SIZE)
    slot = page[:, None] * PAGE_SIZE + t[None, :]
    # one head's labels are contiguous (heads, slots, R): a page is PAGE_SIZE * R values in a row
    lab = tl.load(label_ptr + kvh * stride_lh + slot[:, :, None] * R + c[None, None, :],
                  mask=ok[:, :, None], other=0.0).to(tl.float32)
    if USE_SUM:
        # sum over the group of q_g . k_C = (sum_g q_g)_C . k_C: one product per key
        qs = tl.zeros([R], tl.float32)
        for g in tl.static_range(GROUP):
            qs += tl.load(q_row + g * stride_qh).to(tl.float32)
        s = tl.sum(lab * qs[None, None, :], axis=2)
    else:
        s = tl.full([BLOCK_P, PAGE_SIZE], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qg = tl.load(q_row + g * stride_qh).to(tl.float32)
            s = tl.maximum(s, tl.sum(lab * qg[None, None, :], axis=2))
    if LABEL_QUANT:  # FP8 labels: each token's product times its scale (a power of two > 0: exact, keeps the max)
        s = s * tl.load(lscale_ptr + kvh * stride_lsh + slot, mask=ok, other=0.0)
    best = tl.max(tl.where(ok, s, float("-inf")), axis=1)
    tl.store(out_row + p, best, mask=p < width)


def channel_page_scores(
    q: torch.Tensor,
    k_label: torch.Tensor,
    label_channels: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    aggregate: str = "sum",
    kv_head_map: torch.Tensor | None = None,
    group: int | None = None,
    block_tokens: int | None = None,
    num_warps: int = 4,
    mass: bool = False,
    label_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, Hq, D); labels (Hkv, num_pages * page_size, r) with their channels (Hkv, r) int32;
    page_table (B, P) int32; seq_lens (B,) int32 -> scores (B, Hkv, P) float32: per page, the max
    over its tokens of q_C . k_C (aggregated over the GQA group), -inf past each sequence.
    `mass`: the rope_mass estimate instead, log sum_{g, t} exp(q_gC . k_tC / tau_g) with
    tau_g = sqrt(D |q_gC|_1 / |q_g|_1) (`aggregate` does not apply). FP8 labels take their
    per-token scales `label_scale` (Hkv, num_pages * page_size) float32.

    `kv_head_map` and `group` as for `page_scores` (labels of one pool of several). A program
    scores `block_tokens` tokens' worth of pages of one (sequence, head) (default: 512 for
    rope_mass, else 1,024; docs/benchmarks.md has the tilings measured)."""
    bsz, hq, _ = q.shape
    hkv, slots, r = k_label.shape
    if aggregate not in ("max", "sum"):
        raise ValueError(f"aggregate must be 'max' or 'sum', got {aggregate!r}")
    if kv_head_map is not None and (kv_head_map.shape != (hkv,) or group is None or hkv * group > hq):
        raise ValueError("kv_head_map needs `group` and one entry per label head")
    if (kv_head_map is None and hq % hkv) or label_channels.shape != (hkv, r) or r & (r - 1) \
            or label_channels.dtype != torch.int32 or not k_label.is_contiguous() \
            or not label_channels.is_contiguous() or slots % page_size:
        raise ValueError(f"q {tuple(q.shape)} does not fit labels {tuple(k_label.shape)} "
                         f"with channels {tuple(label_channels.shape)}")
    check_label_scale(k_label, label_scale)
    quant = label_scale is not None
    if q.stride(2) != 1:
        q = q.contiguous()
    if kv_head_map is None:
        group = hq // hkv
    max_pages = page_table.shape[1]
    # rope_mass: PACK sub-blocks of the block side by side times the group's heads (a power of two)
    # fill the matmul's 16 output columns, as far as the block holds that many pages
    block_p = max(1, (block_tokens or (512 if mass else 1024)) // page_size)
    gp = triton.next_power_of_2(group)
    pack = min(max(1, 16 // gp), block_p)
    out = torch.empty((bsz, hkv, max_pages), dtype=torch.float32, device=q.device)
    _channel_scores_kernel[(bsz, hkv, triton.cdiv(max_pages, block_p))](
        q, k_label, label_scale if quant else seq_lens, label_channels, page_table, seq_lens,
        kv_head_map if kv_head_map is not None else seq_lens, out, max_pages, q.stride(0), q.stride(1),
        k_label.stride(0), label_scale.stride(0) if label_scale is not None else 0, page_table.stride(0),
        out.stride(0), out.stride(1), GROUP=group, R=r, PAGE_SIZE=page_size, BLOCK_P=block_p,
        USE_SUM=aggregate == "sum", HAS_MAP=kv_head_map is not None, MASS=mass, HEAD_DIM=q.shape[2],
        GP=gp, PACK=pack, NCOL=max(16, pack * gp), R_PAD=max(r, 16 // pack),
        IEEE=(q.dtype if quant else k_label.dtype) == torch.float32, LABEL_QUANT=quant,
        num_warps=num_warps, **pdl_args(q.device),
    )
    return out


@triton.jit
def _count_pages_kept(s, key, older, p, anchor, top_p, temp, min_keep, keep):
    """Top-p: how many older pages to keep. Each page's estimated share of the softmax mass is
    exp(temp * (score - best)); pages from the anchor on and page 0 (the sink) are kept anyway.
    The fewest best other pages whose mass, with the kept pages', reaches `top_p` of the total,
    plus page 0, between `min_keep` and `keep` (all `keep` for p = 1)."""
    valid = s > float("-inf")
    best = tl.max(tl.where(valid, s, float("-inf")), axis=0)
    w = tl.where(valid, tl.exp2((s - best) * temp), 0.0)
    forced = valid & ((p >= anchor) | (p == 0))
    need = top_p * tl.sum(w, axis=0) - tl.sum(tl.where(forced, w, 0.0), axis=0)
    cand = older & (p != 0)
    # the largest threshold whose pages at or above it carry `need`: bisection on the key bits
    lo = tl.min(tl.where(cand, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(tl.where(cand, key, -2147483648), axis=0).to(tl.int64)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        mass = tl.sum(tl.where(cand & (key >= mid.to(tl.int32)), w, 0.0), axis=0)
        lo = tl.where(mass >= need, mid, lo)
        hi = tl.where(mass >= need, hi, mid - 1)
    n = tl.sum((cand & (key >= lo.to(tl.int32))).to(tl.int32), axis=0)
    n = tl.where(need > 0, n, 0) + 1  # + page 0
    n = tl.where(top_p >= 1.0, keep, n)  # p = 1: the whole budget (not left to float rounding)
    return tl.minimum(tl.maximum(n, min_keep), keep)


@triton.jit
def _store_top_pages_kernel(
    scores_ptr, plan_ptr, store_ptr, counts_ptr, keep, width, top_p, temp, min_keep,
    stride_sb, stride_sh, stride_plan, stride_tb, stride_th, stride_cb,
    BLOCK_P: tl.constexpr, TOP_P: tl.constexpr, FANOUT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    if tl.load(plan_ptr + PLAN_RECOMPUTE * stride_plan + b) == 0:
        return  # this row reuses its stored pages
    anchor = tl.load(plan_ptr + PLAN_ANCHOR * stride_plan + b).to(tl.int32)
    seat = tl.load(plan_ptr + PLAN_SEAT * stride_plan + b)
    p = tl.arange(0, BLOCK_P)
    older = p < anchor
    # float32 -> int32 with the same order (negative floats: flip the magnitude bits); pages from
    # the anchor on rank below every older page
    if TOP_P:
        s = tl.load(scores_ptr + b * stride_sb + h * stride_sh + p, mask=p < width, other=float("-inf"))
    else:
        s = tl.load(scores_ptr + b * stride_sb + h * stride_sh + p, mask=older, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    if TOP_P:
        keep = _count_pages_kept(s, key, older, p, anchor, top_p, temp, min_keep, keep)
        tl.store(counts_ptr + seat * stride_cb + h, keep)
        key = tl.where(p == 0, 2147483647, key)  # the sink page is always kept
    key = tl.where(older, key, -2147483648)
    # the keep-th largest key by a FANOUT-ary search, count(key >= lo) >= keep > count(key > hi),
    # between the smallest and largest older key: each round counts the keys at or above FANOUT - 1
    # thresholds spread over (lo, hi] at once and keeps the interval where the count crosses
    # `keep`; it stops as soon as exactly `keep` keys are at or above one. A round costs a few
    # compares per key but one reduction, so fewer, wider rounds than a bisection's
    lo = tl.min(tl.where(older, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64)
    j = tl.arange(0, FANOUT)
    while lo < hi:
        mids = lo + ((hi - lo) * j + FANOUT - 1) // FANOUT  # mids[0] = lo, then FANOUT - 1 above it
        counts = tl.sum((key[None, :] >= mids.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        best = tl.max(tl.where(counts >= keep, j, 0), axis=0)  # count(key >= lo) >= keep: j = 0 qualifies
        lo_next = tl.sum(tl.where(j == best, mids, 0), axis=0)
        exact = tl.sum(tl.where(j == best, counts, 0), axis=0) == keep
        upper = tl.where(best == FANOUT - 1, hi + 1, tl.sum(tl.where(j == best + 1, mids, 0), axis=0))
        hi = tl.where(exact, lo_next, upper - 1)
        lo = lo_next
    threshold = lo.to(tl.int32)
    above = key > threshold
    tie = key == threshold
    room = keep - tl.sum(above.to(tl.int32), axis=0)  # ties go to the lowest pages
    chosen = (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))) & older
    # the chosen pages in ascending order: each goes to its rank among them
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(store_ptr + seat * stride_tb + h * stride_th + slot, p.to(tl.int32), mask=chosen)


def store_top_pages(
    scores: torch.Tensor, plan: torch.Tensor, store: torch.Tensor, keep: int, num_warps: int | None = None,
    top_p: TopP | None = None, fanout: int = 4,
) -> None:
    """Page selection into the selector's store, in one kernel (no sort).

    For each decoding row b that re-selects (`PlanRow.RECOMPUTE`) and each head h: the `keep`
    pages with the highest scores among those before the row's anchor (`PlanRow.ANCHOR`), in
    ascending order, into `store[seat, h, :keep]` (`PlanRow.SEAT`); ties go to the lower page. Rows that
    reuse their selection are left alone. scores (B, H, P) float32 (-inf past each sequence);
    plan (PLAN_ROWS, >= B) int64 (the selector's plan, rows named by `PlanRow`); store
    (seats, H, >= keep) int32. A re-selecting row has at least `keep` older pages (it does not
    fit the budget).

    With `top_p`, each (row, head) keeps page 0 and the fewest best older pages whose estimated
    share of the softmax mass reaches p (`TopP`), at least `min_keep` and at most `keep` in all,
    and writes how many into `top_p.counts[seat, h]`. `fanout`: thresholds tried per round of the
    search for the keep-th best score, a power of two >= 2 (2: a bisection).
    Reference: `ops.reference.store_top_pages_ref`.
    """
    bsz, heads, width = scores.shape
    if store.shape[1] != heads or store.shape[2] < keep or plan.shape[0] != PLAN_ROWS or plan.shape[1] < bsz:
        raise ValueError(f"scores {tuple(scores.shape)}, plan {tuple(plan.shape)} and store "
                         f"{tuple(store.shape)} do not fit (keep {keep})")
    if fanout < 2 or fanout & (fanout - 1):
        raise ValueError(f"fanout must be a power of two >= 2, got {fanout}")
    if top_p is not None and top_p.counts.shape != store.shape[:2]:
        raise ValueError(f"top-p counts {tuple(top_p.counts.shape)} do not fit store {tuple(store.shape)}")
    if keep == 0 or bsz == 0:
        return
    scores = scores if scores.stride(2) == 1 else scores.contiguous()
    block_p = triton.next_power_of_2(width)
    counts = top_p.counts if top_p is not None else store
    _store_top_pages_kernel[(bsz, heads)](
        scores, plan, store, counts, keep, width,
        top_p.p if top_p else 1.0, top_p.temperature * 1.4426950408889634 if top_p else 1.0,
        top_p.min_keep if top_p else 0,
        scores.stride(0), scores.stride(1), plan.stride(0), store.stride(0), store.stride(1), counts.stride(0),
        BLOCK_P=block_p, TOP_P=top_p is not None, FANOUT=fanout,
        num_warps=num_warps or (4 if block_p <= 2048 else 8 if block_p <= 16384 else 16),
        **pdl_args(scores.device),
    )
