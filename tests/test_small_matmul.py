"""The decode-sized linear kernel against torch's linear (odd sizes, with and without bias)."""

from __future__ import annotations

import pytest
import torch

from lserve.ops.small_matmul import small_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the CPU interpreter's bf16 matmul is wrong (see test_page_scores); fp16 runs everywhere
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 300, False), (5, 130, 257, True), (16, 64, 1000, False)])
def test_small_matmul_equals_linear(dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn((m, k), generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn((n, k), generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    got = small_matmul(x, w, b, block_n=32, block_k=128)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == (m, n)


def test_small_matmul_rejects_what_it_does_not_take() -> None:
    x = torch.zeros((17, 8), dtype=torch.float16, device=DEVICE)
    w = torch.zeros((4, 8), dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="16 rows"):
        small_matmul(x, w)
    with pytest.raises(ValueError, match="dtype"):
        small_matmul(x[:2].float(), w.float())
