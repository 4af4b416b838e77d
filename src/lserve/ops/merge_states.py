"""Merge split-K partial attention results by their log-sum-exp (decode's second pass).

Reference: `ops.reference.merge_states_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.ops.launch import pdl_args, pdl_enter


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, dst_ptr, map_ptr, num_splits, num_heads,
    stride_o_row, stride_o_split, stride_l_row, stride_db, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, GROUP: tl.constexpr, HAS_MAP: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    b = row // num_heads
    head = row % num_heads
    if HAS_MAP:  # head h of the partial results is query head map[h // GROUP] * GROUP + h % GROUP of dst
        head = tl.load(map_ptr + head // GROUP) * GROUP + head % GROUP
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
    tl.store(dst_ptr + b * stride_db + head * stride_dh + d, merged.to(dst_ptr.dtype.element_ty))


def merge_states(
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    head_map: torch.Tensor | None = None,
    group: int = 1,
) -> torch.Tensor:
    """partial_out (B, H, S, D) float32, partial_lse (B, H, S) natural log -> (B, H, D) in `dtype`.

    With `out` (B, H', D) the result is written there (a strided view is fine); with `head_map`
    (H // group,) row h lands in query head `head_map[h // group] * group + h % group` of `out`.
    """
    bsz, heads, splits, d = partial_out.shape
    if partial_lse.shape != (bsz, heads, splits):
        raise ValueError(f"lse {tuple(partial_lse.shape)} does not match out {tuple(partial_out.shape)}")
    if head_map is not None and (out is None or head_map.shape != (heads // group,)):
        raise ValueError("a head map needs `out` and one entry per KV head")
    parts = partial_out.reshape(bsz * heads, splits, d)
    lse = partial_lse.reshape(bsz * heads, splits)
    dst = out if out is not None else torch.empty((bsz, heads, d), dtype=dtype, device=partial_out.device)
    if dst.stride(-1) != 1 or dst.shape[0] != bsz or dst.shape[2] != d:
        raise ValueError(f"out {tuple(dst.shape)} does not hold {bsz} rows of dim {d}")
    _merge_kernel[(bsz * heads,)](
        parts, lse, dst, head_map if head_map is not None else lse, splits, heads,
        parts.stride(0), parts.stride(1), lse.stride(0), dst.stride(0), dst.stride(1),
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(splits)), GROUP=group, HAS_MAP=head_map is not None,
        **pdl_args(dst.device),
    )
    return dst
