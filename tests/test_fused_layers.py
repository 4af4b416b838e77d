"""Fused layer kernels (`ops.fused_layers`) against the model's PyTorch code, which is their reference.

On a CPU the kernels run in Triton's interpreter (float32); on a GPU compiled, plus bfloat16,
where they must repeat PyTorch's intermediate roundings (equal up to an ulp of cos/sin/exp).
"""

from __future__ import annotations

import pytest
import torch

from lserve.model.layers import (
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    _rotate,
    rope_inv_freq,
)
from lserve.ops.fused_layers import rms_norm, rotary_, silu_and_mul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# float32 differs only by summation order and fused multiply-adds; bf16 by one rounding step
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), f"max error {err} (scale {scale})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (33, 576)])
def test_rms_norm_and_fused_add(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(tokens * hidden)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden, generator=gen) * 0.5 + 1
    norm = norm.to(DEVICE, dtype)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(DEVICE, dtype)
    res = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    with torch.no_grad():
        _close(rms_norm(x, norm.weight, norm.eps), norm._norm(x), dtype)
        want_sum = x + res
        want = norm._norm(want_sum)
        res_inplace = res.clone()
        got = rms_norm(x, norm.weight, norm.eps, res_inplace)
    _close(got, want, dtype)
    assert torch.equal(res_inplace, want_sum), "the residual must hold x + residual, rounded like PyTorch's add"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(1, 4, 2, 16), (9, 9, 3, 64), (5, 32, 8, 128), (3, 4, 1, 24), (4, 3, 3, 96),
                                           (2, 20, 20, 32)])
def test_rotary_in_place_on_strided_views(dtype: torch.dtype, tokens: int, hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(tokens + hq)
    rope = RotaryEmbedding(rope_inv_freq(d, 10000.0, None))
    positions = torch.randint(0, 5000, (tokens,), generator=gen).to(DEVICE)
    cos, sin = rope(positions)
    # q and k as the model has them: views into one qkv projection output
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    want_q, want_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    rotary_(q, k, cos, sin)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before), "v must be left alone"


def test_rotary_changes_what_it_should() -> None:
    """Negative test: at position 0 the rotation is the identity, elsewhere it is not."""
    rope = RotaryEmbedding(rope_inv_freq(16, 10000.0, None))
    cos, sin = rope(torch.tensor([0, 3], device=DEVICE))
    q = torch.randn(2, 2, 16, device=DEVICE)
    k = torch.randn(2, 1, 16, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    rotary_(q, k, cos, sin)
    assert torch.allclose(q[0], q0[0]) and torch.allclose(k[0], k0[0])
    assert not torch.allclose(q[1], q0[1], atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (6, 1500), (17, 3000)])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(tokens, 2 * inter, generator=gen) * 4).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    _close(silu_and_mul(x), torch.nn.functional.silu(gate) * up, dtype)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="rotary"):
        rotary_(torch.zeros(2, 2, 8), torch.zeros(3, 1, 8), torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="silu_and_mul"):
        silu_and_mul(torch.zeros(2, 7))


@pytest.mark.gpu
def test_layers_dispatch_to_the_kernels_on_cuda_only_without_autograd() -> None:
    """Inference on CUDA takes the kernels; with autograd (calibration) the PyTorch path, whose
    gradients the kernels would not provide."""
    mlp = GatedMLP(64, 96).cuda()
    x = torch.randn(3, 64, device="cuda", requires_grad=True)
    mlp(x).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        want = mlp.down_proj(torch.nn.functional.silu(gate) * up)
        torch.testing.assert_close(mlp(x), want)
