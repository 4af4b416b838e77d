"""Fused elementwise kernels of the decoder layer: residual add + RMSNorm, rotary, SiLU-and-mul.

A decode step is a few hundred small kernels, and at long context with sparse attention their
count, not their work, sets the step time (docs/benchmarks.md). Each kernel here replaces the
five to eight PyTorch ops of one layer part with one launch. Every rounding of the PyTorch
version (the model's `layers.py`, which is the reference) is repeated explicitly: a bf16
intermediate is rounded where PyTorch rounds it, so both give the same bits up to the last ulp
of cos/sin/exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.ops.launch import pdl_args, pdl_enter


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to the model dtype and back to float32 (where PyTorch stores an intermediate)."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    dt = out_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:  # residual = x + residual, rounded like PyTorch's add, and written back in place
        h = _round(h + tl.load(res_ptr + row * stride_r + cols, mask=m, other=0.0).to(tl.float32), dt)
        tl.store(res_ptr + row * stride_r + cols, h.to(dt), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    y = w * _round(h * rstd, dt)
    tl.store(out_ptr + row * stride_o + cols, y.to(dt), mask=m)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x (T, H) -> (T, H); with `residual`, first `residual += x` (in place) and
    normalise the sum (vLLM's fused_add_rms_norm)."""
    t, n = x.shape
    if x.stride(-1) != 1 or weight.shape != (n,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)} disagree")
    out = torch.empty_like(x)
    if t == 0:
        return out
    res = residual if residual is not None else x
    _rms_norm_kernel[(t,)](
        x, res, weight, out, n, eps, x.stride(0), res.stride(0), out.stride(0),
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 2048 else 4,
        **pdl_args(x.device),
    )
    return out


@triton.jit
def _rotate_heads(ptr, t, stride_t, stride_h, num_heads, h0, c, s,
                  HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads h0 .. h0 + BLOCK_H of token t in place."""
    d = tl.arange(0, BLOCK_D)
    rows = h0 + tl.arange(0, BLOCK_H)
    m = (rows < num_heads)[:, None] & (d < HALF)[None, :]
    dt = ptr.dtype.element_ty
    a1 = ptr + t * stride_t + rows[:, None] * stride_h + d[None, :]
    x1 = tl.load(a1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(a1 + HALF, mask=m, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product rounded, then the sum
    y1 = _round(x1 * c, dt) + _round(-x2 * s, dt)
    y2 = _round(x2 * c, dt) + _round(x1 * s, dt)
    tl.store(a1, y1.to(dt), mask=m)
    tl.store(a1 + HALF, y2.to(dt), mask=m)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per (token, block of BLOCK_H heads): the query heads' blocks first, then the
    key heads'. Side by side rather than in a loop, so that a decode step's one token does not
    pay for its blocks one after another."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    d = tl.arange(0, BLOCK_D)  # HALF rounded up to a power of two (a head of 24 or 96 channels)
    dm = d < HALF
    dt = q_ptr.dtype.element_ty
    # cos/sin repeat over the two halves (the frequencies are concatenated twice)
    c = _round(tl.load(cos_ptr + t * stride_ct + d, mask=dm, other=0.0), dt)[None, :]
    s = _round(tl.load(sin_ptr + t * stride_ct + d, mask=dm, other=0.0), dt)[None, :]
    if block < q_blocks:
        _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, block * BLOCK_H, c, s, HALF, BLOCK_D, BLOCK_H)
    else:
        _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_k_heads, (block - q_blocks) * BLOCK_H, c, s,
                      HALF, BLOCK_D, BLOCK_H)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q (T, Hq, D) and k (T, Hkv, D) in place (strided views are fine) by cos/sin
    (T, 1, D) or (T, D) float32."""
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or q.stride(2) != 1 or k.stride(2) != 1 or d % 2:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    cos, sin = cos.reshape(t, d), sin.reshape(t, d)
    if cos.stride(1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if t == 0:
        return
    block_h = min(16, triton.next_power_of_2(max(hq, k.shape[1])))
    blocks = triton.cdiv(hq, block_h) + triton.cdiv(k.shape[1], block_h)
    _rotary_kernel[(t, blocks)](
        q, k, cos, sin, hq, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HALF=d // 2, BLOCK_D=triton.next_power_of_2(d // 2), BLOCK_H=block_h, **pdl_args(q.device),
    )


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n
    dt = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + n + cols, mask=m, other=0.0).to(tl.float32)
    y = _round(g / (1.0 + tl.exp(-g)), dt) * u
    tl.store(out_ptr + t * stride_o + cols, y.to(dt), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (T, 2I) = [gate | up] -> silu(gate) * up (T, I)."""
    t, two_n = x.shape
    if two_n % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: x {tuple(x.shape)} is not [gate | up]")
    n = two_n // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block,
                                                  **pdl_args(x.device))
    return out
