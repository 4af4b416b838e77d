"""Tensor parallelism for the model classes (Megatron-style), over `torch.distributed`.

A rank builds the model from its shard of the config (`shard_config`: its query and KV heads, its
slice of the MLP's intermediate size and of the vocabulary) and fills it with its slices of the
checkpoint's tensors (`shard_tensor`, used by the weight loader). Column-parallel layers (q/k/v,
gate/up) need no communication; the row-parallel ones (the attention output and MLP down
projections) sum their partial outputs with one all-reduce each; the embedding looks up its own
rows of the vocabulary and all-reduces; the LM head computes its vocabulary slice and the logits
are all-gathered. With one rank (`SINGLE`) every hook is a no-op and the model is unchanged.

Attention stays the caller's business: a rank's attention function sees only its own heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lserve.errors import LServeError
from lserve.model.config import ArchConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (`torch.distributed` initialised by the caller)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    """The process group (None: the default group)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(N, V / size) logits of this rank's vocabulary slice -> (N, vocab_size) on every rank."""
        if self.size == 1:
            return logits
        import torch.distributed as dist

        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]


SINGLE = TensorParallel()


def shard_config(arch: ArchConfig, tp: TensorParallel) -> ArchConfig:
    """The config a rank builds its model from: its heads, intermediate size and vocabulary slice
    (the vocabulary is padded up to a multiple of the ranks). A clear error when the model's
    heads or MLP do not split evenly."""
    if tp.size == 1:
        return arch
    for name, n in (("attention heads", arch.num_heads), ("KV heads", arch.num_kv_heads),
                    ("MLP intermediate size", arch.intermediate_size)):
        if n % tp.size:
            raise LServeError(f"tensor_parallel_size={tp.size} does not divide the model's {n} {name}")
    return dataclasses.replace(
        arch, num_heads=arch.num_heads // tp.size, num_kv_heads=arch.num_kv_heads // tp.size,
        intermediate_size=arch.intermediate_size // tp.size, vocab_size=-(-arch.vocab_size // tp.size),
    )


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the vocabulary: ids outside them look up zeros; the ranks' lookups are summed."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.tp = tp
        self.first = tp.rank * num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        out = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill(outside[..., None], 0))


ROW_PARALLEL = ("o_proj", "down_proj")
"""The projections whose input is split across ranks: their outputs are partial sums."""


def apply_tensor_parallel(model: nn.Module, tp: TensorParallel, vocab_size: int) -> None:
    """Wire a model built from `shard_config` for its rank (before its weights are loaded): the
    vocabulary-parallel embedding, the logits gathered to the model's `vocab_size`, and the
    all-reduce after each row-parallel projection."""
    if tp.size == 1:
        return
    from lserve.model.layers import Linear

    model.tp = tp
    model.full_vocab_size = vocab_size
    emb = model.embed_tokens
    with torch.device("meta"):
        parallel = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, tp)
    model.embed_tokens = parallel.to_empty(device=emb.weight.device).to(emb.weight.dtype)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.rpartition(".")[2] in ROW_PARALLEL:
            if module.bias is not None:
                raise LServeError(f"tensor parallelism does not support a bias on {name}")
            module.reduce = tp.all_reduce


def balanced_kv_order(streaming: list[bool], size: int) -> list[int]:
    """An order of one layer's KV heads whose `size` equal slices hold as equal numbers of
    streaming heads as the flags allow (streaming heads dealt round the ranks, then the dense
    heads fill each slice); within a slice, heads keep their order of dealing."""
    per = len(streaming) // size
    slices: list[list[int]] = [[] for _ in range(size)]
    for i, h in enumerate([h for h, s in enumerate(streaming) if s]):
        slices[i % size].append(h)
    for h in [h for h, s in enumerate(streaming) if not s]:
        next(sl for sl in slices if len(sl) < per).append(h)
    return [h for sl in slices for h in sl]


def permute_kv_heads(
    kind: str, tensor: torch.Tensor, order: list[int], num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """A layer's checkpoint tensor with its KV heads in `order` (and each KV head's query heads
    with it): rows of q_proj/k_proj/v_proj (weights and biases), columns of o_proj.weight. `kind`
    is the HF module and parameter ("q_proj.weight", ...); other tensors are returned as they are."""
    group = num_heads // num_kv_heads
    q_order = [h * group + g for h in order for g in range(group)]
    module, _, _ = kind.partition(".")
    heads = {"q_proj": q_order, "k_proj": order, "v_proj": order, "o_proj": q_order}.get(module)
    if heads is None or (module == "o_proj" and not kind.endswith("weight")):
        return tensor
    idx = (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    return tensor.index_select(1 if module == "o_proj" else 0, idx.to(tensor.device))


def shard_tensor(src: torch.Tensor, dest: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor for a parameter (slice) of shape `dest.shape`: the
    one dimension where they differ is split evenly across the ranks (the vocabulary's last slice
    padded with zeros). Shapes that agree are copied whole."""
    if tuple(src.shape) == tuple(dest.shape) or tp.size == 1 or src.dim() != dest.dim():
        return src
    diff = [d for d in range(src.dim()) if src.shape[d] != dest.shape[d]]
    local = dest.shape[diff[0]] if len(diff) == 1 else 0
    if len(diff) != 1 or not local * (tp.size - 1) < src.shape[diff[0]] <= local * tp.size:
        return src  # not a shard of it: the loader reports the shape mismatch
    d = diff[0]
    start = tp.rank * local
    part = src.narrow(d, start, max(0, min(local, src.shape[d] - start)))
    if part.shape[d] == local:
        return part
    pad = list(src.shape)
    pad[d] = local - part.shape[d]
    return torch.cat([part, src.new_zeros(pad)], dim=d)
