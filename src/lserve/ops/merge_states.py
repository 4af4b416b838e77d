"""Merge split-K partial attention results by their log-sum-exp (decode's second pass).

Reference: `ops.reference.merge_states_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, dst_ptr, num_splits,
    stride_o_row, stride_o_split, stride_l_row, stride_d_row,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    sm = s < num_splits
    lse = tl.load(lse_ptr + row * stride_l_row + s, mask=sm, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # empty splits (lse = -inf) weigh nothing
    total = tl.sum(w, axis=0)
    parts = tl.load(out_ptr + row * stride_o_row + s[:, None] * stride_o_split + d[None, :], mask=sm[:, None], other=0.0)
    merged = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(dst_ptr + row * stride_d_row + d, merged.to(dst_ptr.dtype.element_ty))


def merge_states(partial_out: torch.Tensor, partial_lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial_out (B, H, S, D) float32, partial_lse (B, H, S) natural log -> (B, H, D) in `dtype`."""
    bsz, heads, splits, d = partial_out.shape
    if partial_lse.shape != (bsz, heads, splits):
        raise ValueError(f"lse {tuple(partial_lse.shape)} does not match out {tuple(partial_out.shape)}")
    out = partial_out.reshape(bsz * heads, splits, d)
    lse = partial_lse.reshape(bsz * heads, splits)
    dst = torch.empty((bsz * heads, d), dtype=dtype, device=partial_out.device)
    _merge_kernel[(bsz * heads,)](
        out, lse, dst, splits, out.stride(0), out.stride(1), lse.stride(0), dst.stride(0),
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return dst.view(bsz, heads, d)
