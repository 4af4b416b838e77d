"""The attention backend interface and the registry of backends."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch

from lserve.attention.metadata import AttentionMetadata
from lserve.attention.sparsity import HeadSparsity
from lserve.errors import NotSupportedError
from lserve.kv_cache.layout import KVCacheTensors


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the paged cache and attends over it.

    A backend is built once per engine around the KV tensors; each step the runner plans an
    `AttentionMetadata` and every layer calls `forward` with it.
    """

    name: str = ""

    def __init__(
        self, kv: KVCacheTensors, num_heads: int, scale: float, sparsity: HeadSparsity | None = None
    ) -> None:
        self.kv = kv
        self.num_heads = num_heads
        self.scale = scale
        self.sparsity = sparsity
        self._streaming = [sparsity.layer(i) if sparsity else None for i in range(kv.shape.num_layers)]

    def prepare(self, md: AttentionMetadata) -> None:  # noqa: B027 (optional hook)
        """Per-step planning shared by every layer (called once per step, before the model runs)."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, md: AttentionMetadata
    ) -> torch.Tensor:
        """q (T, Hq, D), k and v (T, Hkv, D) of this step's tokens -> output (T, Hq, D)."""


def resolve_backend_name(name: str, device: torch.device) -> str:
    """auto: Triton kernels on a CUDA GPU, the PyTorch reference elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise NotSupportedError(
            "attention_backend='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for slow testing); "
            "use 'torch' on the CPU"
        )
    return name


def create_backend(
    name: str, kv: KVCacheTensors, num_heads: int, scale: float, sparsity: HeadSparsity | None = None
) -> AttentionBackend:
    from lserve.attention.torch_backend import TorchAttentionBackend

    backends: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}
    if name == "triton":
        from lserve.attention.triton_backend import TritonAttentionBackend

        backends["triton"] = TritonAttentionBackend
    return backends[name](kv, num_heads, scale, sparsity)
