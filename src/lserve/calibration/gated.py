"""Attention callables for calibration: dense, streaming (Λ mask), and their gated mixture.

The model calls an injected `attn(q, k, v, layer_idx)` with q (T, Hq, D) and k, v (T, Hkv, D) of
one whole sequence (positions 0..T-1, no KV cache), so calibration needs no engine machinery:
it hands the model one of these callables. Both branches use torch SDPA in a memory-efficient
form, so activations grow linearly with T (no T x T tensors are kept for the backward pass):
- dense: causal SDPA over the whole sequence (flash attention on CPU and CUDA);
- streaming: query chunks, each over the sink keys plus the keys its window can reach, with the
  Λ mask inside the chunk (key j visible to query i iff j <= i and (j < sink or i - j < local)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lserve.model.llama import AttentionFn, LlamaForCausalLM


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # (T, H, D) -> (1, H, T, D): the 4-D layout lets CPU SDPA use its flash kernel (3-D falls back to math)
    return x.transpose(0, 1).unsqueeze(0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of a whole sequence: q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v),
                                         is_causal=True, enable_gqa=True, scale=scale)
    return out[0].transpose(0, 1)


@dataclass(frozen=True)
class StreamingPlan:
    """Where each query chunk of a length-`t` sequence looks (shared by every layer of a forward).

    Chunk c holds queries [c*chunk, (c+1)*chunk). It needs the sink keys [0, sink) and the window
    keys [c*chunk - local + 1, (c+1)*chunk); no other key is visible to any of its queries. All
    chunks are gathered into one batch (short ones padded with masked keys), so one SDPA call and
    one gather per layer do the work, and the backward pass is one scatter-add.
    """

    length: int
    chunk: int
    key_index: torch.Tensor  # (num_chunks, num_keys) long: sequence position of each gathered key
    mask: torch.Tensor  # (num_chunks, 1, chunk, num_keys) additive: 0 visible, -inf hidden


def streaming_plan(
    t: int, sink: int, local: int, chunk: int, dtype: torch.dtype, device: torch.device
) -> StreamingPlan:
    """The plan for a sequence of `t` tokens; masks are additive floats (CPU flash attention runs
    about twice as fast with them as with boolean masks)."""
    num_chunks = -(-t // chunk)
    num_keys = min(t, sink + local - 1 + chunk)
    starts = torch.arange(num_chunks, device=device) * chunk
    window_start = (starts - local + 1).clamp(min=0)
    sink_end = torch.minimum(window_start, torch.tensor(sink, device=device))  # sink keys not in the window
    slot = torch.arange(num_keys, device=device)[None, :]
    # slots [0, sink_end) hold sink keys, then the window keys in order; extra slots are padding
    pos = torch.where(slot < sink_end[:, None], slot, window_start[:, None] + slot - sink_end[:, None])
    valid = pos < torch.minimum(starts + chunk, torch.tensor(t, device=device))[:, None]
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    i = (starts[:, None] + torch.arange(chunk, device=device)[None, :])[:, :, None]  # (C, chunk, 1)
    j = pos[:, None, :]
    visible = valid[:, None, :] & (j <= i) & ((j < sink) | (i - j < local))
    visible |= (i >= t) & (j == 0)  # padded query rows past the end see one key (their output is dropped)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return StreamingPlan(t, chunk, pos, mask[:, None])


def streaming_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, local: int, chunk: int = 256,
    plan: StreamingPlan | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Λ-mask attention of a whole sequence, in query chunks of `chunk` rows: (T, Hq, D). A sliding
    window is the same with `sink` 0."""
    t, hq, d = q.shape
    if t <= sink + local:  # every causal key is inside the sink or the window
        return dense_attention(q, k, v, scale)
    if plan is None:
        plan = streaming_plan(t, sink, local, chunk, q.dtype, q.device)
    num_chunks, num_keys = plan.key_index.shape
    qc = F.pad(q, (0, 0, 0, 0, 0, num_chunks * chunk - t)).view(num_chunks, chunk, hq, d).transpose(1, 2)
    flat = plan.key_index.reshape(-1)
    kc = k[flat].view(num_chunks, num_keys, *k.shape[1:]).transpose(1, 2)
    vc = v[flat].view(num_chunks, num_keys, *v.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=plan.mask, enable_gqa=True, scale=scale)
    return out.transpose(1, 2).reshape(num_chunks * chunk, hq, d)[:t]


class GatedAttention:
    """`AttentionFn`: per layer and KV head, gate * dense + (1 - gate) * streaming.

    `gates` (num_layers, num_kv_heads) float32, usually a trainable parameter; each gate covers the
    query heads of its GQA group. With `gates=None` the callable is plain dense attention (the
    teacher), and the streaming branch is not computed. A layer with a window in `layer_windows`
    (the model's sliding-window layers) attends within it, teacher and student alike, ungated.
    `scale`: the model's softmax scale (None: head_dim^-1/2).
    """

    def __init__(
        self, gates: torch.Tensor | None, sink: int, local: int, chunk: int = 256, scale: float | None = None,
        layer_windows: tuple[int | None, ...] | None = None,
    ) -> None:
        if sink < 0 or local < 1:
            raise ValueError(f"sink must be >= 0 and local >= 1, got sink={sink}, local={local}")
        self.gates, self.sink, self.local, self.chunk, self.scale = gates, sink, local, chunk, scale
        self.layer_windows = layer_windows
        self._plans: dict[tuple[int, int, int, torch.dtype, torch.device], StreamingPlan] = {}

    def _plan(self, q: torch.Tensor, sink: int, local: int) -> StreamingPlan:
        key = (q.shape[0], sink, local, q.dtype, q.device)
        if key not in self._plans:  # one plan per sequence length and window, reused by every layer and step
            if any(k[0] != q.shape[0] for k in self._plans):
                self._plans.clear()
            self._plans[key] = streaming_plan(q.shape[0], sink, local, self.chunk, q.dtype, q.device)
        return self._plans[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        window = self.layer_windows[layer_idx] if self.layer_windows is not None else None
        if window is not None:
            return streaming_attention(q, k, v, 0, window, self.chunk, self._plan(q, 0, window), self.scale)
        dense = dense_attention(q, k, v, self.scale)
        if self.gates is None:
            return dense
        stream = streaming_attention(q, k, v, self.sink, self.local, self.chunk,
                                     self._plan(q, self.sink, self.local), self.scale)
        group = q.shape[1] // k.shape[1]
        g = self.gates[layer_idx].repeat_interleave(group)[None, :, None]  # (1, Hq, 1)
        # mix in float32 (gates are float32; bf16 would round gates near 1); g = 1 gives dense exactly
        mixed = g * dense.float() + (1.0 - g) * stream.float()
        return mixed.to(q.dtype)


def final_hidden(
    model: LlamaForCausalLM, input_ids: torch.Tensor, attn: AttentionFn, checkpoint_layers: bool = False
) -> torch.Tensor:
    """Final hidden states (T, hidden) of one sequence at positions 0..T-1, before the LM head.

    `checkpoint_layers` recomputes each decoder layer in the backward pass instead of keeping its
    activations (for long contexts or large models: memory of one layer instead of all layers).
    """
    positions = torch.arange(input_ids.shape[0], device=input_ids.device)
    return model(input_ids, positions, attn, checkpoint_layers=checkpoint_layers)
