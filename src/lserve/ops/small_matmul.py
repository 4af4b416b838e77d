"""Linear layers for decode-sized batches (a few rows): a weight-streaming Triton kernel.

At batch 1-16 a linear layer reads its whole weight to produce a few rows: it is a matrix-vector
product bound by memory bandwidth. cuBLAS picks split-K kernels for some of Llama's shapes at
this size (two launches, a partial-sum pass) and reaches about 3.1 TB/s on the H200 for the
attention projections (docs/benchmarks.md). This kernel gives each program a block of output
columns and streams its rows of the weight once, along K, in wide contiguous tiles; the few
input rows ride along in a 16-row tile of a tensor-core matmul with float32 accumulation.

Reference: `torch.nn.functional.linear` (equal up to the order of the float32 sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
"""The most input rows this kernel takes (one 16-row tile); larger batches use cuBLAS."""


@triton.jit
def _small_matmul_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Tuned on an H200 for Llama-3-8B's shapes (benchmarks/decode_layer_parts.py --matmul).
CONFIG = dict(block_n=32, block_k=256, num_warps=4, num_stages=4)


def small_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x (M, K) with M <= 16 rows, weight (N, K), bias (N,) or None -> x @ weight.T + bias (M, N),
    in x's dtype (bf16/fp16; float32 sums)."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"small_matmul takes up to {MAX_ROWS} rows and a row-major weight: "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"small_matmul takes bf16/fp16 inputs of one dtype, got {x.dtype} and {weight.dtype}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = CONFIG
    bn = block_n or cfg["block_n"]
    _small_matmul_kernel[(triton.cdiv(n, bn),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=block_k or cfg["block_k"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out
