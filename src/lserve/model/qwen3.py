"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head's q and k before the rotary
embedding, and no q/k/v biases."""

from __future__ import annotations

import torch

from lserve.model.config import ArchConfig
from lserve.model.layers import RMSNorm
from lserve.model.llama import Attention, DecoderLayer, LlamaForCausalLM


class Qwen3Attention(Attention):
    def __init__(self, cfg: ArchConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one row per (token, head): the fused norm kernel takes 2-D rows
        d = self.head_dim
        return self.q_norm(q.reshape(-1, d)).view(q.shape), self.k_norm(k.reshape(-1, d)).view(k.shape)


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
