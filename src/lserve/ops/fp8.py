"""Triton helpers for the FP8 KV cache: the format of `kv_cache.fp8` (E4M3 values, one
power-of-two float32 scale per token and head), computed bit for bit as its PyTorch reference,
and `dequantize_listed_pages`, which copies chosen pages of an FP8 cache into a model-dtype one.

Rounding to E4M3 is done here in float32 arithmetic, and only the exact result is converted:
the conversion instruction then never rounds, so the GPU and Triton's CPU interpreter (whose
float32 -> float8 conversion drops the carry into the exponent) store the same bytes as torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.ops.paged_inputs import check_kv_scales


@triton.jit
def pow2_scale(amax):
    """float32 amax -> the smallest power of two s >= 2**-126 with amax / s <= 448, and 1 / s
    (both exact), from amax's bits: `kv_cache.fp8.pow2_scale`."""
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    exp = tl.minimum(tl.maximum(exp, 1), 254)
    scale = (exp << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - exp) << 23).to(tl.float32, bitcast=True)
    return scale, inverse


@triton.jit
def round_e4m3(x):
    """float32 x with |x| <= 448 -> the nearest E4M3 value (ties to even), still float32.

    Normal E4M3 numbers keep 3 of float32's 23 mantissa bits: add half a unit of the kept last
    bit (less one, plus the kept bit: ties go to even) and clear the 20 dropped bits. Below 2**-6
    E4M3 is subnormal with a fixed step of 2**-9: adding and taking away 2**14 rounds to that
    step (float32 keeps 24 significant bits)."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + ((bits >> 20) & 1) + 0x7FFFF) & -1048576).to(tl.float32, bitcast=True)
    ax = tl.abs(x)
    small = (ax + 16384.0) - 16384.0
    # x's sign bit put back with an integer OR: a negation may compile to 0 - small, and then
    # a negative x that rounds to zero would store +0.0 where torch stores -0.0
    small = (small.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(ax < 0.015625, small, normal)


@triton.jit
def to_e4m3(x, inverse):
    """float32 x times its scale's inverse, clipped to +-448, rounded (`round_e4m3`) and stored
    as E4M3: the conversion gets an exact value and never rounds."""
    y = tl.minimum(tl.maximum(x * inverse, -448.0), 448.0)
    return round_e4m3(y).to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def quantize_rows(x, AXIS: tl.constexpr):
    """x float32 -> (E4M3 values, float32 scales): one scale per slice along `AXIS` (the head
    dimension: 1 for a (tokens, D) tile, 0 for one token's (D,) row)."""
    scale, inverse = pow2_scale(tl.max(tl.abs(x), axis=AXIS))
    if AXIS == 1:
        inverse = inverse[:, None]
    return to_e4m3(x, inverse), scale


@triton.jit
def _dequantize_pages_kernel(
    kc_ptr, vc_ptr, ks_ptr, vs_ptr, table_ptr, pairs_ptr, ok_ptr, ov_ptr,
    stride_cp, stride_ct, stride_ch, stride_sp, stride_sh, stride_tb, stride_op, stride_ot, stride_oh,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One (listed page, head): the page's K and V rows of the head, times their scales, into
    the destination page of the output in its dtype."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(pairs_ptr + 3 * i)
    logical = tl.load(pairs_ptr + 3 * i + 1)
    dst = tl.load(pairs_ptr + 3 * i + 2).to(tl.int64)
    src = tl.load(table_ptr + row * stride_tb + logical).to(tl.int64)
    t = tl.arange(0, PAGE)
    d = tl.arange(0, HEAD_DIM)
    at = src * stride_cp + t[:, None] * stride_ct + h * stride_ch + d[None, :]
    to = dst * stride_op + t[:, None] * stride_ot + h * stride_oh + d[None, :]
    scale_at = src * stride_sp + h * stride_sh + t
    k = tl.load(kc_ptr + at).to(tl.float32) * tl.load(ks_ptr + scale_at)[:, None]
    tl.store(ok_ptr + to, k.to(ok_ptr.dtype.element_ty))
    v = tl.load(vc_ptr + at).to(tl.float32) * tl.load(vs_ptr + scale_at)[:, None]
    tl.store(ov_ptr + to, v.to(ov_ptr.dtype.element_ty))


def dequantize_listed_pages(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    page_table: torch.Tensor, pairs: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor,
) -> None:
    """For each row (r, j, p) of `pairs` ((n, 3) int32): page `page_table[r, j]` of the FP8 caches
    (num_pages, page_size, H, D), dequantized, into page p of out_k / out_v (their own page
    count, same page size and heads, the model's dtype). Reference: `kv_cache.fp8.dequantize_pages`."""
    check_kv_scales(k_cache, k_scale, v_scale, page_table)
    if out_k.shape[1:] != k_cache.shape[1:] or out_v.shape != out_k.shape or not out_k.is_contiguous() \
            or not out_v.is_contiguous() or pairs.dtype != torch.int32 or pairs.shape[1:] != (3,):
        raise ValueError(f"outputs {tuple(out_k.shape)} and pairs {tuple(pairs.shape)} do not fit cache "
                         f"{tuple(k_cache.shape)}")
    if not pairs.shape[0]:
        return
    _, page, heads, dim = k_cache.shape
    _dequantize_pages_kernel[(pairs.shape[0], heads)](
        k_cache, v_cache, k_scale, v_scale, page_table, pairs.contiguous(), out_k, out_v,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        page_table.stride(0), out_k.stride(0), out_k.stride(1), out_k.stride(2), PAGE=page, HEAD_DIM=dim,
    )
