"""Copy Hugging Face-named tensors into `LlamaForCausalLM`, fusing q/k/v and gate/up on the way."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from lserve.errors import ModelLoadError
from lserve.model.llama import LlamaForCausalLM
from lserve.model.parallel import SINGLE, TensorParallel, permute_kv_heads, shard_tensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF sub-name -> (our parameter sub-name, index of the slice inside the fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_IGNORED = ("rotary_emb.inv_freq",)


def _fused_slices(model: LlamaForCausalLM, target: str) -> list[tuple[int, int]]:
    cfg = model.config
    if target.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    n = cfg.intermediate_size
    return [(0, n), (n, 2 * n)]


def map_name(model: LlamaForCausalLM, hf_name: str) -> tuple[str, tuple[int, int] | None] | None:
    """HF parameter name -> (our parameter name, row slice inside it or None); None to skip."""
    if any(hf_name.endswith(s) for s in _IGNORED):
        return None
    if hf_name == "lm_head.weight":
        return None if model.lm_head is None else ("lm_head.weight", None)
    m = _LAYER.match(hf_name)
    if m is None:
        name = hf_name.removeprefix("model.")
        return name, None
    layer, rest = m.groups()
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        target, idx = _FUSED[module]
        return f"layers.{layer}.{target}.{kind}", _fused_slices(model, target)[idx]
    return f"layers.{layer}.{rest}", None


def load_named_tensors(
    model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]],
    rename: Callable[[str], str | None] | None = None, tp: TensorParallel = SINGLE,
    kv_order: list[list[int]] | None = None,
) -> None:
    """Copy every tensor into its parameter; raise ModelLoadError on unknown names, bad shapes or gaps.
    `rename` maps a checkpoint name to the text model's HF name first (None: skip the tensor).
    Under tensor parallelism each tensor is sliced to this rank's shard as it is read, after its
    layer's KV heads (and their query heads) are put in `kv_order[layer]` when given."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for name_in_file, tensor in tensors:
        hf_name = rename(name_in_file) if rename is not None else name_in_file
        if hf_name is None:
            continue
        mapped = map_name(model, hf_name)
        if mapped is None:
            continue
        name, rows = mapped
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"unexpected weight {hf_name!r} in checkpoint")
        dest = param.data if rows is None else param.data[rows[0] : rows[1]]
        layer = _LAYER.match(hf_name)
        if kv_order is not None and layer is not None:
            cfg = model.config
            kind = layer.group(2).removeprefix("self_attn.")
            tensor = permute_kv_heads(kind, tensor, kv_order[int(layer.group(1))], cfg.num_heads * tp.size,
                                      cfg.num_kv_heads * tp.size, cfg.head_dim)
        tensor = shard_tensor(tensor, dest, tp)
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"weight {hf_name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(dest.shape)}"
            )
        dest.copy_(tensor.to(dtype=dest.dtype))
        filled[name] = filled.get(name, 0) + (dest.shape[0] if rows is not None else param.shape[0])
    missing = [n for n, p in params.items() if filled.get(n, 0) < p.shape[0]]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelLoadError(f"checkpoint is missing weights: {shown}")
