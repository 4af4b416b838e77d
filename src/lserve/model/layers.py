"""Building blocks of the Llama family: RMSNorm, rotary embeddings (with llama3 scaling), gated MLP.

The PyTorch code here is the reference. On a CUDA GPU, outside autograd, the same steps run as
fused Triton kernels (`lserve.ops.fused_layers`: one launch instead of five to eight, which is
what a decode step's time is made of at long context); they repeat every rounding of this code.
A one-row product of a decode step at batch 1 runs as a GEMV kernel (`Linear`, `lserve.ops.gemv`),
which sums in float32 as cuBLAS does, in another order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def use_fused_kernels(x: torch.Tensor) -> bool:
    """The Triton kernels serve inference on CUDA; autograd (calibration) takes the PyTorch path."""
    return x.is_cuda and not torch.is_grad_enabled()


def gemv_serves(x: torch.Tensor, weight: torch.Tensor, max_rows: int, fp8_weight: bool = False) -> bool:
    """Whether `lserve.ops.gemv` can take x times `weight`: inference on a GPU outside autocast, 1 to
    `max_rows` contiguous half-precision rows, and a weight of x's dtype (or an FP8 one with its
    scales), contiguous along K. Whatever the weight's shape: which products go there is the
    caller's choice."""
    return (use_fused_kernels(x) and not torch.is_autocast_enabled() and x.dim() == 2
            and 1 <= x.shape[0] <= max_rows and x.dtype in (torch.bfloat16, torch.float16)
            and (weight.dtype == x.dtype or fp8_weight) and x.stride(1) == 1 and weight.stride(1) == 1)


def lm_head_product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (N, H) times the LM head's (vocab, H) weight. One half-precision row on a GPU (a
    decode step at batch 1) goes through the GEMV, which reads Llama-3-8B's bfloat16 head faster
    than cuBLAS (docs/benchmarks.md); the rest through `F.linear`."""
    if gemv_serves(hidden, weight, max_rows=1):
        from lserve.ops.gemv import gemv

        return gemv(hidden, weight)
    return nn.functional.linear(hidden, weight)


class Linear(nn.Linear):
    """`nn.Linear` whose one-row products (a decode step at batch 1: half precision, on a GPU,
    outside autograd and autocast) run through `lserve.ops.gemv` for weights with K >= N / 2:
    q/k/v, output and down. There it reads the weight faster than cuBLAS does (measured in
    docs/benchmarks.md). The wide gate/up weight goes through `GatedMLP`'s fused form instead,
    the LM head through `lm_head_product`. Class settings, for A/B timing: `use_gemv`, `gemv_rows` (the
    most rows it serves; larger batches are not measured yet) and `gemv_kw` (keywords of
    `gemv`, its tiling).

    After `quantize_fp8_` the weight is E4M3 with a float32 scale per output channel
    (`quantization="fp8"`, `lserve.ops.fp8_linear`): products quantize x per token and go through
    `torch._scaled_mm`; a one-row product goes through the GEMV kernel, which reads the FP8 weight
    and keeps x as it is."""

    use_gemv = True
    gemv_rows = 1
    gemv_kw: dict = {}
    reduce: Any = None
    """Set on a row-parallel projection under tensor parallelism (`model.parallel`): sums the
    ranks' partial outputs."""
    weight_scale: torch.Tensor | None = None
    """FP8 weights: (out_features,) float32 scales. A plain attribute, not a buffer, so that
    `model.to(dtype)` cannot round them."""
    fp8_out_dtype: torch.dtype | None = None
    """FP8 weights: what `torch._scaled_mm` writes on this device (`ops.fp8_linear.check_fp8_matmul`)."""

    def quantize_fp8_(self, out_dtype: torch.dtype) -> None:
        """Replace the weight, in place, by its E4M3 values and per-output-channel scales."""
        from lserve.ops.fp8_linear import quantize_weight

        values, scales = quantize_weight(self.weight.detach())
        self.weight = nn.Parameter(values, requires_grad=False)
        self.weight_scale = scales
        self.fp8_out_dtype = out_dtype

    def serves_gemv(self, x: torch.Tensor) -> bool:
        """Whether `lserve.ops.gemv` can take x times this weight (whatever the weight's shape)."""
        return self.use_gemv and gemv_serves(x, self.weight, self.gemv_rows, self.weight_scale is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 2 * self.in_features >= self.out_features and self.serves_gemv(x):
            from lserve.ops.gemv import gemv

            out = gemv(x, self.weight, self.bias, weight_scale=self.weight_scale, **self.gemv_kw)
        elif self.weight_scale is not None:
            from lserve.ops.fp8_linear import fp8_linear

            assert self.fp8_out_dtype is not None
            out = fp8_linear(x, self.weight, self.weight_scale, self.bias, self.fp8_out_dtype)
        else:
            out = super().forward(x)
        return out if self.reduce is None else self.reduce(out)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference implementations do."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_kernels(x):
            from lserve.ops.fused_layers import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return self._norm(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the fused kernel updates `residual` in place."""
        if use_fused_kernels(x):
            from lserve.ops.fused_layers import rms_norm

            return rms_norm(x, self.weight, self.eps, residual), residual
        total = x + residual
        return self._norm(total), total

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, freq_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with the model's rope scaling applied."""
    # Explicitly on the CPU in float32: models are built under a meta device and a low default dtype.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if freq_factors is not None:  # GGUF stores llama3 scaling as per-frequency divisors
        return inv_freq / freq_factors.float()
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[index]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)  # type: ignore[arg-type]
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    ramp = (old_len / wavelen - low) / (high - low)
    blended = (1 - ramp) * slowed / factor + ramp * slowed
    in_between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_between, blended, slowed)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding; cos/sin are computed once per step from the positions."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = inv_freq.float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, 1, D) float32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hkv, D) rotated by cos/sin (T, 1, D); the fused kernel rotates in place."""
    if use_fused_kernels(q):
        from lserve.ops.fused_layers import rotary_

        rotary_(q, k, cos, sin)
        return q, k
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored zero-centred and scales by (1 + weight), and the
    product is taken in float32 before rounding (Llama's rounds first). Plain PyTorch on every
    device: the fused kernel repeats Llama's roundings, not these."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GatedMLP(nn.Module):
    """Gated feed-forward (SiLU, or Gemma's tanh-approximated GELU) with the gate and up
    projections fused into one matmul. The fused GPU kernels compute SiLU: other activations
    take the PyTorch path."""

    gated_gemv = True
    """One decode row (where `Linear` would serve a GEMV) takes the gate/up product and SiLU-and-mul
    in one kernel (`ops.gemv`, `gated`): a class setting, for A/B timing."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation != "silu":
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)
        if self.gated_gemv and self.gate_up_proj.bias is None and self.gate_up_proj.serves_gemv(x):
            from lserve.ops.gemv import gemv

            up = self.gate_up_proj
            return self.down_proj(gemv(x, up.weight, gated=True, weight_scale=up.weight_scale, **up.gemv_kw))
        gate_up = self.gate_up_proj(x)
        if use_fused_kernels(gate_up):
            from lserve.ops.fused_layers import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)
