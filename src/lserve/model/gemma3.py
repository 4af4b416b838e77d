"""Gemma 3 text models (`Gemma3ForCausalLM`, and the text weights of `Gemma3ForConditionalGeneration`).

Against the Llama decoder: embeddings scaled by sqrt(hidden); RMSNorms that scale by
(1 + weight) in float32 (`GemmaRMSNorm`), around attention and the MLP both before and after
("sandwich" norms); per-head q/k norms; a tanh-GELU gated MLP; the attention scale
`query_pre_attn_scalar`^-1/2; and two rotary embeddings, the local one (its own base, no scaling)
for the sliding-window layers and the global one (base and scaling) for the others. Which layers
slide, and how far, is the config's `layer_windows`: the attention function applies it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lserve.model.config import ArchConfig
from lserve.model.layers import (
    GatedMLP,
    GemmaRMSNorm,
    Linear,
    RotaryEmbedding,
    apply_rotary,
    lm_head_product,
    rope_inv_freq,
)
from lserve.model.llama import AttentionFn
from lserve.model.parallel import SINGLE, TensorParallel

Rope = tuple[torch.Tensor, torch.Tensor]


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, attn: AttentionFn) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        return self.o_proj(attn(q, k, v, self.layer_idx).reshape(t, -1))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.sliding = cfg.layer_windows[layer_idx] is not None
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, global_rope: Rope, local_rope: Rope, attn: AttentionFn) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), local_rope if self.sliding else global_rope, attn)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    """The Gemma 3 text decoder, with the interface of `LlamaForCausalLM`. `rotary` is the global
    layers' embedding (what page selection's RoPE channels are chosen from)."""

    tp: TensorParallel = SINGLE
    full_vocab_size: int = 0

    def __init__(self, cfg: ArchConfig, rope_freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rope_freq_factors))
        local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        self.local_rotary = RotaryEmbedding(rope_inv_freq(cfg.head_dim, local_theta, None))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn, checkpoint_layers: bool = False
    ) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, hidden)."""
        emb = self.embed_tokens(input_ids)
        # the scale rounded to the weights' dtype first, as the reference does
        x = emb * torch.tensor(self.config.hidden_size**0.5, dtype=emb.dtype)
        global_rope, local_rope = self.rotary(positions), self.local_rotary(positions)
        for layer in self.layers:
            if checkpoint_layers:
                x = checkpoint(layer, x, global_rope, local_rope, attn, use_reentrant=False)
            else:
                x = layer(x, global_rope, local_rope, attn)
        return self.norm(x)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm(x if residual is None else x + residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> float32 logits (N, vocab), soft-capped when the model says so."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.tp.gather_vocab(lm_head_product(hidden, weight).float(), self.full_vocab_size)
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap
