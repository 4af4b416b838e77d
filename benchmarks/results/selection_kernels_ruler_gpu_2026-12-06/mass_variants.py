"""Scratch: rope_mass score kernel variants (2D tiles; tl.dot over the group) against the engine's."""
import torch
import triton
import triton.language as tl

from lserve.ops.launch import pdl_args, pdl_enter


@triton.jit
def _mass2d_kernel(
    q_ptr, label_ptr, chan_ptr, page_table_ptr, seq_lens_ptr, map_ptr, out_ptr, width,
    stride_qb, stride_qh, stride_lh, stride_pt_b, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, R: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_MAP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    pblock = tl.program_id(2)
    src = kvh
    if HAS_MAP:
        src = tl.load(map_ptr + kvh)
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, PAGE_SIZE)
    out_row = out_ptr + b * stride_ob + kvh * stride_oh
    pp = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    if pblock * BLOCK_P >= num_pages:
        tl.store(out_row + pp, tl.full([BLOCK_P], float("-inf"), tl.float32), mask=pp < width)
        return
    rows = tl.arange(0, BLOCK_P * PAGE_SIZE)
    p = pblock * BLOCK_P + rows // PAGE_SIZE
    pos = p * PAGE_SIZE + rows % PAGE_SIZE
    ok = pos < seq_len
    page = tl.load(page_table_ptr + b * stride_pt_b + p, mask=p < num_pages, other=0).to(tl.int64)
    c = tl.arange(0, R)
    row_ptr = label_ptr + kvh * stride_lh + (page * PAGE_SIZE + rows % PAGE_SIZE) * R
    lab = tl.load(row_ptr[:, None] + c[None, :], mask=ok[:, None], other=0.0)  # (T, R) in the store's dtype
    chans = tl.load(chan_ptr + kvh * R + c)
    q_head = q_ptr + b * stride_qb + (src * GROUP) * stride_qh
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    qc = tl.load(q_head + g[:, None] * stride_qh + chans[None, :], mask=g_ok[:, None], other=0.0)  # (G, R)
    d = tl.arange(0, HEAD_DIM)
    l1 = tl.sum(tl.abs(tl.load(q_head + g[:, None] * stride_qh + d[None, :], mask=g_ok[:, None],
                               other=0.0).to(tl.float32)), axis=1)
    tau = tl.maximum(tl.sqrt(HEAD_DIM * tl.sum(tl.abs(qc.to(tl.float32)), axis=1) / tl.maximum(l1, 1e-30)), 1e-20)
    inv = tl.where(g_ok, 1.4426950408889634 / tau, 0.0)  # log2(e) / tau_g
    if DOT:
        if IEEE:
            s = tl.dot(lab, tl.trans(qc), input_precision="ieee")
        else:
            s = tl.dot(lab, tl.trans(qc.to(lab.dtype)))
        s = s * inv[None, :]  # (T, G) base-2 logits
        s = tl.where(ok[:, None] & g_ok[None, :], s, float("-inf"))
        s3 = tl.reshape(s, (BLOCK_P, PAGE_SIZE * GROUP_PAD))
        m = tl.max(s3, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.sum(tl.exp2(s3 - m_safe[:, None]), axis=1)
    else:
        labf = lab.to(tl.float32)
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_P], tl.float32)
        for gi in tl.static_range(GROUP):
            qg = tl.load(q_head + gi * stride_qh + chans).to(tl.float32)
            ig = tl.sum(tl.where(g == gi, inv, 0.0), axis=0)
            sg = tl.where(ok, tl.sum(labf * qg[None, :], axis=1) * ig, float("-inf"))
            sg2 = tl.reshape(sg, (BLOCK_P, PAGE_SIZE))
            m_new = tl.maximum(m, tl.max(sg2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(sg2 - m_safe[:, None]), axis=1)
            m = m_new
    best = tl.where(acc > 0, (m + tl.log2(tl.where(acc > 0, acc, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(out_row + pp, best, mask=pp < width)


def mass2d(q, k_label, label_channels, page_table, seq_lens, page_size, kv_head_map=None, group=None,
           block_tokens=1024, num_warps=4, dot=True):
    bsz, hq, dim = q.shape
    hkv, slots, r = k_label.shape
    if kv_head_map is None:
        group = hq // hkv
    max_pages = page_table.shape[1]
    block_p = max(1, block_tokens // page_size)
    out = torch.empty((bsz, hkv, max_pages), dtype=torch.float32, device=q.device)
    _mass2d_kernel[(bsz, hkv, triton.cdiv(max_pages, block_p))](
        q, k_label, label_channels, page_table, seq_lens, kv_head_map if kv_head_map is not None else seq_lens,
        out, max_pages, q.stride(0), q.stride(1), k_label.stride(0), page_table.stride(0), out.stride(0),
        out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), R=r, PAGE_SIZE=page_size,
        BLOCK_P=block_p, HAS_MAP=kv_head_map is not None, HEAD_DIM=dim, DOT=dot,
        IEEE=k_label.dtype == torch.float32, num_warps=num_warps, **pdl_args(q.device),
    )
    return out


from lserve.ops.page_scores import PLAN_ANCHOR, PLAN_RECOMPUTE, PLAN_SEAT  # noqa: E402


@triton.jit
def _store_kary_kernel(
    scores_ptr, plan_ptr, store_ptr, keep, width,
    stride_sb, stride_sh, stride_plan, stride_tb, stride_th,
    BLOCK_P: tl.constexpr, K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    if tl.load(plan_ptr + PLAN_RECOMPUTE * stride_plan + b) == 0:
        return
    anchor = tl.load(plan_ptr + PLAN_ANCHOR * stride_plan + b).to(tl.int32)
    seat = tl.load(plan_ptr + PLAN_SEAT * stride_plan + b)
    p = tl.arange(0, BLOCK_P)
    older = p < anchor
    s = tl.load(scores_ptr + b * stride_sb + h * stride_sh + p, mask=older, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(older, key, -2147483648)
    lo = tl.min(tl.where(older, key, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64)
    jj = tl.arange(0, K)
    while lo < hi:
        mids = lo + ((hi - lo) * jj + K - 1) // K  # mids[0] = lo, then K - 1 thresholds above it
        counts = tl.sum((key[None, :] >= mids.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        jstar = tl.max(tl.where(counts >= keep, jj, 0), axis=0)
        new_lo = tl.sum(tl.where(jj == jstar, mids, 0), axis=0)
        c_star = tl.sum(tl.where(jj == jstar, counts, 0), axis=0)
        nxt = tl.sum(tl.where(jj == jstar + 1, mids, 0), axis=0)
        nxt = tl.where(jstar == K - 1, hi + 1, nxt)
        lo = new_lo
        hi = tl.where(c_star == keep, new_lo, nxt - 1)
    threshold = lo.to(tl.int32)
    above = key > threshold
    tie = key == threshold
    room = keep - tl.sum(above.to(tl.int32), axis=0)
    chosen = (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))) & older
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(store_ptr + seat * stride_tb + h * stride_th + slot, p.to(tl.int32), mask=chosen)


def store_kary(scores, plan, store, keep, k=8, num_warps=None):
    bsz, heads, width = scores.shape
    block_p = triton.next_power_of_2(width)
    _store_kary_kernel[(bsz, heads)](
        scores, plan, store, keep, width, scores.stride(0), scores.stride(1), plan.stride(0), store.stride(0),
        store.stride(1), BLOCK_P=block_p, K=k,
        num_warps=num_warps or (4 if block_p <= 2048 else 8 if block_p <= 16384 else 16), **pdl_args(scores.device),
    )
