"""Triton helpers for the FP8 KV cache: the format of `kv_cache.fp8` (E4M3 values, one
power-of-two float32 scale per token and head), computed bit for bit as its PyTorch reference.

Rounding to E4M3 is done here in float32 arithmetic, and only the exact result is converted:
the conversion instruction then never rounds, so the GPU and Triton's CPU interpreter (whose
float32 -> float8 conversion drops the carry into the exponent) store the same bytes as torch.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    small = tl.where(bits < 0, -small, small)  # (the sign bit: -0.0 stays -0.0, as in torch)
    return tl.where(ax < 0.015625, small, normal)


@triton.jit
def quantize_rows(x, AXIS: tl.constexpr):
    """x float32 -> (E4M3 values, float32 scales): one scale per slice along `AXIS` (the head
    dimension: 1 for a (tokens, D) tile, 0 for one token's (D,) row)."""
    scale, inverse = pow2_scale(tl.max(tl.abs(x), axis=AXIS))
    if AXIS == 1:
        inverse = inverse[:, None]
    y = tl.minimum(tl.maximum(x * inverse, -448.0), 448.0)
    return round_e4m3(y).to(tl.float8e4nv), scale
