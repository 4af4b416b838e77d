"""The decode GEMV kernel against float64 matmuls: odd sizes (not multiples of the tiles), a
strided x, half precision, bias, and clear errors for what it does not serve."""

from __future__ import annotations

import pytest
import torch

from lserve.ops.gemv import MAX_ROWS, gemv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(37, 100), (16, 64), (70, 333)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_matmul(rows: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn((rows, k), generator=g).to(DEVICE)
    w = torch.randn((n, k), generator=g).to(DEVICE)
    b = torch.randn((n,), generator=g).to(DEVICE) if bias else None
    got = gemv(x, w, b, block_n=16, block_k=32)
    want = x.double() @ w.double().T + (b.double() if b is not None else 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_gemv_strided_rows_half_precision_and_default_tiles() -> None:
    g = torch.Generator().manual_seed(5)
    big = torch.randn((4, 300), generator=g).to(torch.float16).to(DEVICE)
    x = big[:, 20:277]  # rows 300 apart, K = 257
    w = (torch.randn((45, 257), generator=g) / 16).to(torch.float16).to(DEVICE)
    got = gemv(x, w)
    assert got.dtype == torch.float16 and got.shape == (4, 45)
    want = x.double() @ w.double().T
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_gemv_rejects_what_it_does_not_serve() -> None:
    w = torch.zeros((8, 16), device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros((MAX_ROWS + 1, 16), device=DEVICE), w)
    with pytest.raises(ValueError, match="do not multiply"):
        gemv(torch.zeros((1, 15), device=DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.zeros((1, 16), device=DEVICE), w, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.zeros((1, 16), device=DEVICE, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.zeros((1, 16), device=DEVICE), w, torch.zeros(16, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="power of two"):
        gemv(torch.zeros((1, 16), device=DEVICE), w, block_n=3)
    with pytest.raises(ValueError, match="prefetch_k must be a power of two"):
        gemv(torch.zeros((1, 16), device=DEVICE), w, prefetch_k=48)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("prefetch_k", [128, 4096])
def test_gemv_prefetch_changes_nothing(gated: bool, prefetch_k: int) -> None:
    """The L2 prefetch (where the GPU launches the kernel early) reads nothing into the product:
    the same bits with and without it, including a prefetch wider than K (clamped) and rows past
    N in the last program."""
    g = torch.Generator().manual_seed(prefetch_k + gated)
    dtype = torch.float16
    x = torch.randn((1, 333), generator=g).to(dtype).to(DEVICE)
    w = (torch.randn((2 * 37, 333), generator=g) / 16).to(dtype).to(DEVICE)
    want = gemv(x, w, gated=gated, block_n=8)
    assert torch.equal(gemv(x, w, gated=gated, block_n=8, prefetch_k=prefetch_k), want)


def test_lm_head_takes_the_gemv_for_one_row_on_a_gpu() -> None:
    """`lm_head_product` equals F.linear; on a GPU one half-precision row (a decode step at batch
    1) goes through the GEMV, more rows and float32 through cuBLAS."""
    from unittest import mock

    from lserve.model.layers import lm_head_product

    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(4)
    weight = (torch.randn((1000, 96), generator=g) / 8).to(DEVICE, dtype)  # vocab >> hidden, as LM heads are
    with torch.no_grad(), mock.patch("lserve.ops.gemv.gemv", wraps=gemv) as spy:
        for rows, dt in ((1, dtype), (3, dtype), (1, torch.float32)):
            hidden = torch.randn((rows, 96), generator=g).to(DEVICE, dt)
            want = hidden.double() @ weight.double().T
            torch.testing.assert_close(lm_head_product(hidden, weight.to(dt)).double(), want, rtol=2e-3, atol=2e-3)
    assert spy.call_count == (1 if DEVICE.type == "cuda" else 0)


def test_linear_takes_the_gemv_only_where_it_should() -> None:
    """`model.layers.Linear` equals nn.Linear everywhere; on a GPU, one half-precision row of a
    K >= N/2 weight goes through the GEMV (the others, and autograd, through cuBLAS)."""
    from unittest import mock

    from lserve.model.layers import GatedMLP, Linear

    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(3)
    narrow, wide = Linear(64, 48).to(DEVICE, dtype), Linear(16, 64, bias=False).to(DEVICE, dtype)
    with torch.no_grad(), mock.patch("lserve.ops.gemv.gemv", wraps=gemv) as spy:
        for layer, rows in ((narrow, 1), (narrow, 3), (wide, 1)):
            x = torch.randn((rows, layer.in_features), generator=g).to(DEVICE, dtype)
            want = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double()
                                              if layer.bias is not None else None)
            torch.testing.assert_close(layer(x).double(), want, rtol=2e-3, atol=2e-3)
        mlp = GatedMLP(16, 20).to(DEVICE, dtype)  # gate/up (40, 16): one gated GEMV for one row
        x = torch.randn((1, 16), generator=g).to(DEVICE, dtype)
        gate, up = torch.nn.functional.linear(x.double(), mlp.gate_up_proj.weight.double()).chunk(2, dim=-1)
        want = torch.nn.functional.linear(gate * torch.sigmoid(gate) * up, mlp.down_proj.weight.double())
        torch.testing.assert_close(mlp(x).double(), want, rtol=1e-2, atol=1e-2)
    # on a GPU only: the narrow layer's single row, then the MLP's gated product and its down
    # projection (K >= N/2)
    assert spy.call_count == (3 if DEVICE.type == "cuda" else 0)
    if DEVICE.type == "cuda":
        assert spy.call_args_list[1].kwargs.get("gated") is True


@pytest.mark.parametrize("rows,n,k,tiles", [(2, 130, 520, dict(block_n=32, block_k=128)),
                                             (1, 37, 2500, {})])  # {}: the engine's tiling, K past 2 tiles
def test_gemv_bfloat16_rounds_like_a_float32_sum(rows: int, n: int, k: int, tiles: dict) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn((rows, k), generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn((n, k), generator=g) / 23).to(torch.bfloat16).to(DEVICE)
    got = gemv(x, w, **tiles)
    want = (x.float() @ w.float().T).to(torch.bfloat16)  # float32 sums, one rounding at the end
    assert float((got.float() - want.float()).abs().max()) <= float(want.float().abs().max()) * 2**-7


@pytest.mark.parametrize("rows,i,k", [(1, 37, 300), (3, 20, 1100)])
def test_gated_gemv_is_silu_of_gate_times_up(rows: int, i: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows + i + k)
    x = torch.randn((rows, k), generator=g).to(DEVICE)
    w = (torch.randn((2 * i, k), generator=g) / k**0.5).to(DEVICE)
    got = gemv(x, w, gated=True)
    prod = x.double() @ w.double().T
    gate, up = prod[:, :i], prod[:, i:]
    torch.testing.assert_close(got.double(), gate * torch.sigmoid(gate) * up, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="gated"):
        gemv(x, w[:-1], gated=True)
    with pytest.raises(ValueError, match="gated"):
        gemv(x, w, torch.zeros(2 * i, device=DEVICE), gated=True)


def test_gated_gemv_in_bfloat16_rounds_as_the_unfused_path() -> None:
    """The unfused path stores gate/up in bf16, then SiLU(gate) in bf16, then the product: with
    the same tiles (the same float32 sums) the fused kernel gives the very same bits."""
    from lserve.ops.fused_layers import silu_and_mul

    g = torch.Generator().manual_seed(11)
    x = torch.randn((1, 2500), generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn((74, 2500), generator=g) / 50).to(torch.bfloat16).to(DEVICE)
    got = gemv(x, w, gated=True, block_n=4, block_k=512)
    assert torch.equal(got, silu_and_mul(gemv(x, w, block_n=4, block_k=512)))
