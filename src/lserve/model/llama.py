"""One decoder for the Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2), and the
interface every model class of the registry offers (`forward`, `final_norm`, `compute_logits`,
`embed_tokens`, `rotary`, `config`).

Inputs are flat: all tokens of a step in one (T,) tensor with their positions. Attention over
past tokens is delegated to an `AttentionFn` the caller passes in; the model knows nothing about
the KV cache, pages or sparsity (a sliding window is the attention function's business too: the
config's `layer_windows` says where).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lserve.model.config import ArchConfig
from lserve.model.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    lm_head_product,
    rope_inv_freq,
)
from lserve.model.parallel import SINGLE, TensorParallel


class AttentionFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int
    ) -> torch.Tensor:
        """q (T, Hq, D), k and v (T, Hkv, D) of the new tokens -> output (T, Hq, D)."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionFn
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.norm_qk(q, k)
        q, k = apply_rotary(q, k, *rope)
        out = attn(q, k, v, self.layer_idx)  # (T, Hq, D)
        return self.o_proj(out.reshape(t, -1))

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q/k normalisation before the rotary embedding (none in the Llama family)."""
        return q, k


class DecoderLayer(nn.Module):
    attention_cls: type[Attention] = Attention

    def __init__(self, cfg: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x', residual'), where the hidden state is x + residual (residual None:
        the hidden state is x). Carrying the sum lazily lets each add fuse into the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, attn)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied to the embedding when the model says so)."""

    layer_cls: type[nn.Module] = DecoderLayer
    tp: TensorParallel = SINGLE
    """This rank's place in a tensor-parallel group (`model.parallel`; set by the loader)."""
    full_vocab_size: int = 0

    def __init__(self, cfg: ArchConfig, rope_freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rope_freq_factors)
        self.rotary = RotaryEmbedding(inv_freq)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn, checkpoint_layers: bool = False
    ) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, hidden). `checkpoint_layers`
        recomputes each layer in the backward pass instead of keeping its activations (training)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            if checkpoint_layers:
                x, residual = checkpoint(layer, x, residual, rope, attn, use_reentrant=False)
            else:
                x, residual = layer(x, residual, rope, attn)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The final RMSNorm of the hidden state x + residual."""
        return self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> float32 logits (N, vocab)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.tp.gather_vocab(lm_head_product(hidden, weight).float(), self.full_vocab_size)
