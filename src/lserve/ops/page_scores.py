"""Query-aware page scores for dynamic sparsity (Quest's bound with LServe's hierarchical paging).

For a decode query q and a logical page with channel-wise key bounds kmin, kmax, the largest
possible q.k in the page is sum_c max(q_c kmax_c, q_c kmin_c), computed elementwise in float32. A physical page scores the
max over its logical pages; logical pages that start past the sequence are ignored (their
statistics belong to nobody yet). The query heads of a GQA group share one selection: their
scores are aggregated by max (default) or sum. Reference: `ops.reference.page_scores_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, page_table_ptr, seq_lens_ptr, out_ptr,
    stride_qb, stride_qh, stride_sg, stride_sh, stride_pt_b, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    LOGICAL: tl.constexpr, BLOCK_P: tl.constexpr, USE_SUM: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    pblock = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, PAGE_SIZE)
    if pblock * BLOCK_P >= num_pages:
        return  # past the sequence: the output keeps its -inf (the grid covers the widest table)
    d = tl.arange(0, HEAD_DIM)
    p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < num_pages
    page = tl.load(page_table_ptr + b * stride_pt_b + p, mask=p_ok, other=0).to(tl.int64)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for sub in tl.static_range(PAGE_SIZE // LOGICAL):
        ok = p_ok & (p * PAGE_SIZE + sub * LOGICAL < seq_len)
        row = page * (PAGE_SIZE // LOGICAL) + sub
        addr = row[:, None] * stride_sg + kvh * stride_sh + d[None, :]
        kmax = tl.load(kmax_ptr + addr, mask=ok[:, None], other=0.0).to(tl.float32)
        kmin = tl.load(kmin_ptr + addr, mask=ok[:, None], other=0.0).to(tl.float32)
        # Elementwise float32 products (no tensor-core dot: the GQA group is a handful of rows,
        # and tf32 rounding could reorder close pages), one query head of the group at a time.
        agg = tl.zeros([BLOCK_P], tl.float32) if USE_SUM else tl.full([BLOCK_P], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qg = tl.load(q_ptr + b * stride_qb + (kvh * GROUP + g) * stride_qh + d).to(tl.float32)
            s = tl.sum(tl.maximum(qg[None, :] * kmax, qg[None, :] * kmin), axis=1)  # (BLOCK_P,)
            agg = agg + s if USE_SUM else tl.maximum(agg, s)
        best = tl.maximum(best, tl.where(ok, agg, float("-inf")))
    tl.store(out_ptr + b * stride_ob + kvh * stride_oh + p, best, mask=p_ok)


def page_scores(
    q: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    logical_page_size: int,
    aggregate: str = "max",
) -> torch.Tensor:
    """q (B, Hq, D); statistics (num_pages * page_size // logical, Hkv, D); page_table (B, P) int32;
    seq_lens (B,) -> scores (B, Hkv, P) float32, -inf for pages past each sequence."""
    bsz, hq, d = q.shape
    hkv = k_min.shape[1]
    if aggregate not in ("max", "sum"):
        raise ValueError(f"aggregate must be 'max' or 'sum', got {aggregate!r}")
    if hq % hkv or k_min.shape != k_max.shape or k_min.shape[2] != d or not k_min.is_contiguous():
        raise ValueError(f"q {tuple(q.shape)} does not fit statistics {tuple(k_min.shape)}")
    if page_size % logical_page_size:
        raise ValueError(f"page size {page_size} is not a multiple of {logical_page_size}")
    max_pages = page_table.shape[1]
    out = torch.full((bsz, hkv, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    block_p = 32
    group = hq // hkv
    _page_scores_kernel[(bsz, hkv, triton.cdiv(max_pages, block_p))](
        q, k_min, k_max, page_table, seq_lens, out,
        q.stride(0), q.stride(1), k_min.stride(0), k_min.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE_SIZE=page_size,
        LOGICAL=logical_page_size, BLOCK_P=block_p, USE_SUM=aggregate == "sum",
    )
    return out


def select_pages(
    scores: torch.Tensor, seq_lens: torch.Tensor, page_size: int, token_budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top pages within `token_budget` plus always the newest page; every page when the context fits.

    scores (B, Hkv, P) -> (page_list (B, Hkv, K) int32 sorted ascending, lengths (B, Hkv) int32).
    """
    bsz, hkv, max_pages = scores.shape
    budget_pages = max(1, token_budget // page_size)
    num_pages = (seq_lens.long() + page_size - 1) // page_size  # (B,)
    k = int(min(budget_pages, max_pages))
    newest = (num_pages - 1).view(bsz, 1, 1).expand(bsz, hkv, 1)
    older = scores.clone()
    older.scatter_(2, newest, float("-inf"))  # the newest page is kept anyway
    top = older.topk(max(k - 1, 0), dim=2).indices if k > 1 else older[..., :0].long()
    chosen = torch.cat([top, newest], dim=2)
    everything = torch.arange(k, device=scores.device).view(1, 1, k).expand(bsz, hkv, k)
    fits = (num_pages <= budget_pages).view(bsz, 1, 1)
    chosen = torch.where(fits, everything, chosen).sort(dim=2).values
    lengths = torch.where(fits.view(bsz, 1), num_pages.view(bsz, 1), torch.full_like(num_pages.view(bsz, 1), k))
    return chosen.to(torch.int32).contiguous(), lengths.expand(bsz, hkv).to(torch.int32).contiguous()
