"""Top-k page selection in one launch: the page selector's "select" step on the GPU.

For every decoding row that re-selects this step and every KV head, keep the `keep` pages with
the highest scores among the row's older pages (those before its anchor page, which is read
anyway), in ascending page order, in the selector's store. One program per (row, head) holds
the row's scores in registers: each score is packed with its page index into one int64 key
(float order preserved, index as tie-break), the keys are sorted to find the keep-th largest,
and a prefix sum over the pages at or above it gives each kept page its slot, so the stored list
comes out ascending without a second sort. In PyTorch this is a masked fill, a top-k, a sort,
a gather, a where and an indexed write per layer (`PageSelector.update` keeps that path as the
reference and for the torch backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select_kernel(
    scores_ptr, store_ptr, plan_ptr, keep,
    stride_sb, stride_sh, stride_st_seat, stride_st_h, stride_plan,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    # plan rows: 0 recompute, 1 fits, 2 pages, 3 anchor, 4 seat
    redo = tl.load(plan_ptr + b)
    fits = tl.load(plan_ptr + stride_plan + b)
    if (redo == 0) | (fits != 0):
        return
    anchor = tl.load(plan_ptr + 3 * stride_plan + b)
    seat = tl.load(plan_ptr + 4 * stride_plan + b)
    p = tl.arange(0, BLOCK_P)
    older = p < anchor
    s = tl.load(scores_ptr + b * stride_sb + h * stride_sh + p, mask=older, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    key = (ordered.to(tl.int64) << 32) | p.to(tl.int64)
    key = tl.where(older, key, -9223372036854775807 - 1)  # never chosen
    ranked = tl.sort(key, descending=True)
    threshold = tl.max(tl.where(p == keep - 1, ranked, -9223372036854775807 - 1), axis=0)
    chosen = older & (key >= threshold)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(store_ptr + seat * stride_st_seat + h * stride_st_h + slot, p.to(tl.int32), mask=chosen)


def select_top_pages_(scores: torch.Tensor, store: torch.Tensor, plan: torch.Tensor, keep: int) -> None:
    """Update `store` (seats + 1, H, >= keep) int32 in place from `scores` (B, H, P) float32 for the
    rows whose plan says so. `plan` (5, seats + 1) int64: recompute, fits, pages, anchor and seat
    per row (the page selector's device plan); rows that fit or reuse are left alone."""
    bsz, heads, pages = scores.shape
    if store.shape[1] != heads or store.shape[2] < keep or plan.shape[0] != 5 or plan.shape[1] < bsz:
        raise ValueError(f"scores {tuple(scores.shape)}, store {tuple(store.shape)} and plan "
                         f"{tuple(plan.shape)} disagree")
    if keep < 1 or scores.stride(2) != 1 or store.stride(2) != 1 or plan.stride(1) != 1:
        raise ValueError("keep must be >= 1 and the last dims contiguous")
    block = max(16, triton.next_power_of_2(pages))
    _select_kernel[(bsz, heads)](
        scores, store, plan, keep,
        scores.stride(0), scores.stride(1), store.stride(0), store.stride(1), plan.stride(0),
        BLOCK_P=block, num_warps=8 if block >= 2048 else 4,
    )
