"""The FP8 KV cache format (`kv_cache_dtype="fp8"`), in plain PyTorch: the reference that the
Triton KV-append kernel writes and the attention kernels read (`ops.fp8`).

K and V are stored as E4M3 (`torch.float8_e4m3fn`, largest finite value 448) with one float32
scale per (token, KV head) for K and one for V: a value is `fp8 * scale`. The scale is the
smallest power of two that brings the token's largest |element| of that head to at most 448, so
a row's largest element lands in (224, 448] and keeps E4M3's full 3-bit mantissa.

Why per token and head, and why powers of two (docs/sparsity.md, "FP8 KV cache"):
- a token's scale is fixed when it is written: appending to a page never rescales the page's
  earlier tokens (a per-page scale would have to grow as tokens arrive, or clip them);
- one outlier token (an attention sink's key, a rare large value) costs only its own row's
  precision, not its page's;
- multiplying or dividing by a power of two is exact in floating point, so quantizing is a
  single rounding (to E4M3, nearest-even), identical here and in the kernels, and the scale can
  be applied to a score (`q . k8 * s`) or a probability (`p * s . v8`) instead of to every
  element, with the same result;
- the cost is 4 bytes per token and head for K and again for V: 1/32 of the FP8 data at head
  dimension 128, 1/16 at 64.

What page selection keeps (key min/max, key labels) is computed from the unquantized keys and
stays in the model's dtype.
"""

from __future__ import annotations

import torch

from lserve.errors import LServeError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_DTYPE = torch.float32
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
"""vLLM's names: auto keeps the model's dtype; fp8 and fp8_e4m3 are the same E4M3 format."""

_MANTISSA_448 = 0x600000
"""The float32 mantissa bits of 1.75 (448 = 1.75 * 2**8)."""


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype K and V are stored in: the model's for `auto`, else E4M3."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_DTYPE
    raise LServeError(f"kv_cache_dtype={name!r} is not one of {', '.join(map(repr, KV_CACHE_DTYPES))}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 amax (any shape) -> the smallest power of two s >= 2**-126 with amax / s <= 448.

    Read off amax's float32 bits (amax = m * 2**e, 1 <= m < 2): s = 2**(e - 8) when m <= 1.75,
    else 2**(e - 7). The kernels compute it from the same bits."""
    bits = amax.float().contiguous().view(torch.int32)
    biased = (bits >> 23) & 0xFF
    exp = biased - 8 + ((bits & 0x7FFFFF) > _MANTISSA_448).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (E4M3 values (..., D), float32 scales (...)): one scale per row of D."""
    x = x.float()
    scale = pow2_scale(x.abs().amax(-1))
    inverse = (254 - (scale.view(torch.int32) >> 23) << 23).view(torch.float32)  # 1 / scale, exact
    return (x * inverse[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E4M3 values (..., D) and their scales (...) -> (..., D) in `dtype`."""
    return (values.float() * scale.unsqueeze(-1)).to(dtype)


def write_rows(
    cache: torch.Tensor, scales: torch.Tensor | None, new: torch.Tensor, slots: torch.Tensor
) -> None:
    """Rows new (T, H, D) into a (num_pages, page_size, H, D) cache at flat slots (T,); an FP8
    cache (with its (num_pages, H, page_size) scales) takes them quantized."""
    num_pages, page_size = cache.shape[:2]
    if scales is not None:
        new, row_scales = quantize(new)
        scales[slots // page_size, :, slots % page_size] = row_scales
    as_bytes(cache).view(num_pages * page_size, *cache.shape[2:]).index_copy_(0, slots, as_bytes(new))


def quantize_pages(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (num_pages, page_size, H, D) cache -> its E4M3 values and (num_pages, H, page_size) scales."""
    values, scales = quantize(cache)
    return values, scales.transpose(1, 2).contiguous()


def dequantize_pages(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E4M3 pages (num_pages, page_size, H, D) with their (num_pages, H, page_size) scales -> `dtype`."""
    return dequantize(values, scales.transpose(1, 2), dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A view that copy kernels accept: FP8 tensors as uint8 (CPU index_copy has no FP8 kernel)."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t
