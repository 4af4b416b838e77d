"""Matrix-vector products for decode steps: y = x W^T (+ b) for a few rows of x.

A decode step at batch 1 reads every weight once per token, so its projections are bound by
memory bandwidth, and cuBLAS (with its split-K reduction) reads Llama-3-8B's weights well below
the GPU's bandwidth; this kernel reads them faster (`benchmarks/gemv_decode.py`; the figures are
in docs/benchmarks.md). Each program takes BLOCK_N output columns over the whole of K (no
split-K, so no reduction kernel after it): its weight rows are one contiguous slab. The loop
accumulates elementwise products and reduces once after it (no shuffles or barriers per tile),
with the loads software-pipelined (`num_stages`). It waits for the kernel before it (programmatic dependent launch,
ops/launch.py) before reading anything. Accumulation is float32, per program in K order.
The `gated` form takes a [gate | up] weight and writes silu(gate) * up: each program reads the
matching gate and up rows, so the MLP's SiLU-and-mul needs no kernel of its own.

An FP8 weight (`quantization="fp8"`: E4M3 with a scale per output channel, `ops.fp8_linear`)
is read as it is stored, half the bytes of a bfloat16 one, and multiplied with x as it is (W8A16):
the weight's scale is applied after the sum. The multi-row path also quantizes x per token (W8A8,
for the FP8 tensor cores); a one-row product is bound by the weight's bytes, so quantizing x
gains nothing there. A version that did (a first pass over K in every program for x's scale)
read its one-byte weights much more slowly (docs/benchmarks.md); this one skips that pass.

Reference: `x.float() @ w.float().T`; with an FP8 weight, `x.float() @ (w.float() * scale[:, None]).T`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.kv_cache.fp8 import is_fp8
from lserve.ops.launch import pdl_args, pdl_enter

MAX_ROWS = 8
"""Rows of x that the kernel serves (decode batches)."""


@triton.jit
def _prefetch_l2(ptrs):
    """Bring the lines at `ptrs` into L2 (PTX `prefetch.global.L2`; nothing is read into registers)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, W_FP8: tl.constexpr, PDL: tl.constexpr,
    PREFETCH_K: tl.constexpr, LINE: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    m = tl.arange(0, M_PAD)[:, None, None]
    n = n0 + tl.arange(0, BLOCK_N)[None, :, None]
    kk = tl.arange(0, BLOCK_K)[None, None, :]
    m_ok = m < M
    n_ok = n < N
    w_rows = w_ptr + n.to(tl.int64) * stride_wn
    up_rows = w_ptr + (n + N).to(tl.int64) * stride_wn  # GATED: rows N.. of [gate | up]
    if PDL and PREFETCH_K > 0:
        # the weight does not depend on the kernel before: ask L2 for the first PREFETCH_K
        # columns of this program's rows while that kernel (or the wave before) still runs
        tl.extra.cuda.gdc_launch_dependents()
        lines = tl.minimum(tl.arange(0, PREFETCH_K // LINE) * LINE, K - 1)[None, :]  # one address per line
        rows = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)[:, None].to(tl.int64)
        _prefetch_l2(w_ptr + rows * stride_wn + lines)
        if GATED:
            _prefetch_l2(w_ptr + (rows + N) * stride_wn + lines)
        tl.extra.cuda.gdc_wait()
    else:
        pdl_enter(PDL)
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)  # GATED: the up rows, N below
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(x_ptr + m * stride_xm + k, mask=m_ok & k_ok, other=0.0).to(tl.float32)  # (M_PAD, 1, BLOCK_K)
        acc += x * tl.load(w_rows + k, mask=n_ok & k_ok, other=0.0).to(tl.float32)  # (1, BLOCK_N, BLOCK_K)
        if GATED:
            acc_up += x * tl.load(up_rows + k, mask=n_ok & k_ok, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=2)  # (M_PAD, BLOCK_N)
    n2 = n0 + tl.arange(0, BLOCK_N)
    m2 = tl.arange(0, M_PAD)
    dt = out_ptr.dtype.element_ty
    if W_FP8:  # each output channel's scale, after the sum
        y = y * tl.load(ws_ptr + n2, mask=n2 < N, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)[None, :]
    if GATED:  # silu(gate) * up, rounded where the unfused path stores (ops.fused_layers.silu_and_mul)
        u = tl.sum(acc_up, axis=2)
        if W_FP8:
            u = u * tl.load(ws_ptr + N + n2, mask=n2 < N, other=0.0)[None, :]
        g = y.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    tl.store(out_ptr + m2[:, None] * stride_om + n2[None, :], y.to(dt),
             mask=(m2 < M)[:, None] & (n2 < N)[None, :])


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    gated: bool = False,
    weight_scale: torch.Tensor | None = None,
    prefetch_k: int | None = None,
) -> torch.Tensor:
    """x (M, K) with 1 <= M <= MAX_ROWS, weight (N, K) and bias (N,) of x's dtype -> (M, N).

    `gated`: the weight is [gate | up] (2I, K), with no bias, and the result is silu(gate) * up
    (M, I), rounded as `ops.fused_layers.silu_and_mul` rounds the unfused product.

    `weight_scale` (N,) float32: the weight is E4M3 (`ops.fp8_linear.quantize_weight`), read as
    stored; each output is scaled after its sum (x is not quantized).

    `prefetch_k` (a power of two, 0: off): where the kernel launches early (programmatic dependent
    launch, ops/launch.py), each program first asks L2 for the first `prefetch_k` columns of its
    weight rows, before it waits for the kernel before it. The result is the same either way.

    The default tiling (4 columns a program, 1024-wide K tiles for one row, 4 warps, 3 stages, no
    prefetch) was the fastest over Llama-3-8B's q/k/v, output and down shapes at one row on an
    H200 in bfloat16. FP8 weights default to 8 columns a program and a 1,024-column prefetch,
    which made the whole 256K decode step fastest on an H100 (docs/benchmarks.md)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    rows, k = x.shape
    n = weight.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"gemv serves 1..{MAX_ROWS} rows, got {rows}")
    if weight_scale is not None:
        if not is_fp8(weight.dtype) or weight_scale.dtype != torch.float32 or weight_scale.shape != (n,) \
                or weight_scale.stride(0) != 1:
            raise ValueError(f"an FP8 product needs an E4M3 weight and (N,) float32 scales, got {weight.dtype} "
                             f"and {weight_scale.dtype} {tuple(weight_scale.shape)}")
        if bias is not None and bias.dtype != x.dtype:
            raise ValueError(f"x ({x.dtype}) and bias ({bias.dtype}) need one dtype")
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x ({x.dtype}), weight ({weight.dtype}) and bias need one dtype")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    if block_n is None:
        block_n = 8 if weight_scale is not None else 4
    if prefetch_k is None:
        prefetch_k = 1024 if weight_scale is not None else 0
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias {tuple(bias.shape)} does not match {n} outputs or is not contiguous")
    for name, size in (("block_n", block_n), ("block_k", block_k), ("prefetch_k", prefetch_k or None)):
        if size is not None and (size < 1 or size & (size - 1)):
            raise ValueError(f"{name} must be a power of two, got {size}")
    if gated:
        if n % 2 or bias is not None:
            raise ValueError(f"a gated product needs [gate | up] rows (an even count, got {n}) and no bias")
        n //= 2
    m_pad = triton.next_power_of_2(rows)
    if block_k is None:  # about 64 float32 accumulators per thread
        accumulators = m_pad * block_n * (2 if gated else 1)
        block_k = max(32, min(1024, triton.next_power_of_2(64 * 32 * num_warps // accumulators)))
    line = 128 // weight.element_size()  # weight elements per 128-byte line
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale if weight_scale is not None else x, bias if bias is not None else x, out,
        rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, HAS_BIAS=bias is not None,
        GATED=gated, W_FP8=weight_scale is not None, PREFETCH_K=prefetch_k, LINE=max(1, min(prefetch_k, line)),
        num_warps=num_warps, **pdl_args(x.device),
    )
    return out
