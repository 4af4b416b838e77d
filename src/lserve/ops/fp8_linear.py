"""FP8 linear layers (`quantization="fp8"`): E4M3 weights with one scale per output channel,
activations quantized per token as they arrive, products through `torch._scaled_mm`.

The number format is the FP8 KV cache's (`kv_cache.fp8`): E4M3 values with a float32 power-of-two
scale per row. A weight (N, K) has one row per output channel, an activation (M, K) one per
token. With E4M3's fixed 3-bit mantissa a power-of-two scale loses nothing against amax / 448
(each row's largest element still lands in (224, 448]), and it keeps quantizing a single
rounding, identical in PyTorch and in the Triton kernels here, so the GPU and CPU store the same
bytes for the same inputs.

y = (x8 @ w8^T) * x_scale * w_scale (+ bias): `fp8_linear` takes the product through
`torch._scaled_mm` with per-row scales and fast accumulation (Hopper and Ada GPUs' FP8 tensor
cores; recent CPU builds of torch have it too, and ignore the fast accumulation).
`check_fp8_matmul` tries it once on the engine's device and gives a clear error where it is
missing: there is no silent fallback. A one-row decode product goes through the
GEMV kernel instead (`ops.gemv`, `weight_scale`), which reads the FP8 weight and keeps x as it is
(W8A16: bound by the weight's bytes, it gains nothing from quantizing x).

Reference: `fp8_linear_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lserve.errors import NotSupportedError
from lserve.kv_cache.fp8 import FP8_DTYPE, is_fp8, quantize
from lserve.ops.fp8 import pow2_scale, to_e4m3

FP8_GEMM_ALIGN = 16
"""`torch._scaled_mm` needs both dimensions of the weight to be multiples of 16."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (E4M3 (N, K), float32 (N,) scales), one per output channel."""
    values, scales = quantize(weight)
    return values.contiguous(), scales.contiguous()


def can_quantize(weight: torch.Tensor) -> bool:
    """Whether `torch._scaled_mm` takes this (N, K) weight (both sizes multiples of 16)."""
    return weight.dim() == 2 and all(size % FP8_GEMM_ALIGN == 0 for size in weight.shape)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    """One row of x: its largest |element| sets the power-of-two scale; then the row, divided
    by it, rounded to E4M3 (`kv_cache.fp8.quantize`, bit for bit)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)))
    scale, inverse = pow2_scale(tl.max(amax, axis=0))
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k, to_e4m3(x, inverse), mask=k < K)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (E4M3 (M, K), float32 (M, 1) scales), one per token: one Triton
    kernel on a GPU, `kv_cache.fp8.quantize` elsewhere (the same bytes)."""
    if x.dim() != 2:
        raise ValueError(f"activations must be (tokens, features), got {tuple(x.shape)}")
    if x.is_cuda:
        return quantize_activations_kernel(x)
    values, scales = quantize(x)
    return values, scales[:, None]


def quantize_activations_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activations` by the Triton kernel, on any device Triton runs on (the interpreter too)."""
    rows, k = x.shape
    values = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        x = x if x.stride(1) == 1 else x.contiguous()
        block = min(4096, triton.next_power_of_2(k))
        _quantize_rows_kernel[(rows,)](x, values, scales, k, x.stride(0), values.stride(0), BLOCK=block,
                                       num_warps=4 if block <= 1024 else 8)
    return values, scales


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x (..., K) in the model's dtype times an E4M3 weight (N, K) with its (N,) scales -> (..., N)
    in x's dtype: x is quantized per token and the product taken by `torch._scaled_mm`, which
    writes `out_dtype` (`check_fp8_matmul`'s answer for this device and model dtype)."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    values, scales = quantize_activations(rows)
    # Fast accumulation (Hopper's FP8 products promoted to float32 less often; CPUs ignore it):
    # faster prefill projections for a small fraction of E4M3's own rounding error
    # (docs/benchmarks.md). vLLM's CUTLASS FP8 kernels accumulate the same way.
    out = torch._scaled_mm(values, weight.t(), scale_a=scales, scale_b=weight_scale[None, :],
                           out_dtype=out_dtype, use_fast_accum=True)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, weight.shape[0])


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: x quantized per token, the exact E4M3 values multiplied in float32, both
    scales applied, bias added, rounded to x's dtype."""
    values, scales = quantize(x.reshape(-1, x.shape[-1]))
    out = (values.float() @ weight.float().t()) * scales[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def check_fp8_matmul(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype `torch._scaled_mm` with per-row scales takes on `device` for a model in
    `dtype` (the model's own where it can, else bfloat16); a clear error where it cannot run at all."""
    a = torch.ones((16, 16), dtype=torch.float32, device=device).to(FP8_DTYPE)
    sa = torch.ones((16, 1), dtype=torch.float32, device=device)
    sb = torch.ones((1, 16), dtype=torch.float32, device=device)
    failure: Exception | None = None
    for out_dtype in dict.fromkeys((dtype, torch.bfloat16)):
        try:
            out = torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
            if float(out[0, 0]) == 16.0:
                return out_dtype
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            failure = exc
    where = device.type
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    reason = f": {str(failure).splitlines()[0]}" if failure is not None else ""
    raise NotSupportedError(
        f"quantization='fp8' needs FP8 matrix products (torch._scaled_mm with per-row scales: NVIDIA GPUs "
        f"of compute capability 8.9 or newer, such as L4, H100, H200; or a CPU build of torch that has it); "
        f"torch {torch.__version__} on {where} has not{reason}"
    )


__all__ = [
    "FP8_DTYPE", "can_quantize", "check_fp8_matmul", "fp8_linear", "fp8_linear_reference", "is_fp8",
    "quantize_activations", "quantize_activations_kernel", "quantize_weight",
]
