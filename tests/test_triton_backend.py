"""The Triton backend against the same simulated engine steps as the torch backend.

Mixed steps (decodes first, then prefill chunks after cached prefixes), ragged decode batches,
page tables with gaps; under TRITON_INTERPRET=1 on a CPU, compiled on a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lserve.attention.backend import resolve_backend_name, triton_head_dim_supported
from lserve.attention.triton_backend import TritonAttentionBackend
from lserve.errors import NotSupportedError
from tests.test_torch_backend import run_scenario

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 dots run as tf32 on the GPU's tensor cores
F32_TOL = 5e-3 if DEVICE.type == "cuda" else 1e-4


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_triton_backend_matches_reference(hq: int, hkv: int, page_size: int) -> None:
    run_scenario(
        hq=hq, hkv=hkv, head_dim=32, page_size=page_size, dtype=torch.float32, atol=F32_TOL, rtol=F32_TOL,
        seed=7 * page_size + hq, num_layers=2, steps=5, backend_cls=TritonAttentionBackend, device=DEVICE,
    )


@pytest.mark.parametrize("page_size", [16, 64])
def test_triton_backend_with_an_fp8_cache_matches_reference(page_size: int) -> None:
    """The KV-append kernel stores the bytes and scales of `kv_cache.fp8.quantize`, and the
    prefill and decode kernels attend over the dequantized history."""
    run_scenario(
        hq=8, hkv=2, head_dim=32, page_size=page_size, dtype=torch.float32, atol=F32_TOL, rtol=F32_TOL,
        seed=5 * page_size + 1, num_layers=2, steps=5, backend_cls=TritonAttentionBackend, device=DEVICE, fp8=True,
    )


@pytest.mark.gpu
def test_triton_backend_bfloat16_on_gpu() -> None:
    run_scenario(
        hq=8, hkv=2, head_dim=128, page_size=64, dtype=torch.bfloat16, atol=3e-2, rtol=3e-2,
        seed=3, num_layers=2, steps=5, backend_cls=TritonAttentionBackend, device=DEVICE,
    )


@pytest.mark.gpu
def test_triton_backend_bfloat16_fp8_cache_on_gpu() -> None:
    run_scenario(
        hq=8, hkv=2, head_dim=128, page_size=64, dtype=torch.bfloat16, atol=3e-2, rtol=3e-2,
        seed=4, num_layers=2, steps=5, backend_cls=TritonAttentionBackend, device=DEVICE, fp8=True,
    )


def test_backend_choice_follows_the_head_size(caplog: pytest.LogCaptureFixture) -> None:
    """auto takes the Triton kernels on a GPU only where they support the head size (a power of
    two from 16 to 256) and says so when it does not; asking for Triton there is a clear error."""
    cuda = torch.device("cuda")
    assert resolve_backend_name("auto", cuda, 128) == "triton"
    assert resolve_backend_name("auto", torch.device("cpu"), 128) == "torch"
    with caplog.at_level(logging.WARNING, logger="lserve.attention.backend"):
        assert resolve_backend_name("auto", cuda, 96) == "torch"
    assert "head_dim=96" in caplog.text
    with pytest.raises(NotSupportedError, match="head_dim to be a power of two"):
        resolve_backend_name("triton", cuda, 24)
    assert [d for d in (8, 16, 24, 64, 96, 256, 512) if triton_head_dim_supported(d)] == [16, 64, 256]
