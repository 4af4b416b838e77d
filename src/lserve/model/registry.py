"""The model registry: one entry per supported architecture.

An entry says which model class serves an architecture, which names it goes by (Hugging Face
`architectures` and `model_type`, GGUF `general.architecture`), how checkpoint tensor names map
onto the class's parameters (HF prefixes to rewrite or skip, GGUF tensor names) and what its
GGUF files need undone. Adding an architecture is one model module plus one entry here.

Model classes are named by module path and imported on first use, so that reading a config
(which asks the registry whether an architecture is supported) does not import every model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from lserve.errors import ModelLoadError

# GGUF per-layer tensor names (after `blk.N.`) -> our HF-style sub-names, shared by the Llama family
_LLAMA_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QK_NORM_GGUF = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GEMMA3_GGUF_LAYER = {
    **_LLAMA_GGUF_LAYER,
    **_QK_NORM_GGUF,
    # Gemma's sandwich norms: llama.cpp calls the MLP's pre-norm `ffn_norm`
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class ArchSpec:
    """What lserve knows about one architecture."""

    name: str
    """The HF `architectures` entry (also the name errors and docs use)."""
    model_class: str
    """"module:Class" of the model (imported on first use)."""
    hf_model_types: tuple[str, ...] = ()
    """HF `model_type` values that mean this architecture when `architectures` is absent."""
    gguf_arch: str | None = None
    """GGUF `general.architecture`, None when lserve reads no GGUF of it."""
    gguf_layer_names: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_GGUF_LAYER))
    gguf_permuted_rope: bool = False
    """llama.cpp permuted the q/k rows into interleaved rotary pairs (the `llama` converter)."""
    gguf_norm_offset: float = 0.0
    """Added to GGUF norm weights (llama.cpp stores Gemma's 1 + w; lserve keeps w)."""
    hf_prefixes: tuple[tuple[str, str], ...] = ()
    """(old, new) prefixes of checkpoint tensor names rewritten before mapping (multimodal
    checkpoints keep the text model under another prefix); a new prefix of "" skips the tensor."""
    text_config_key: str | None = None
    """The config.json key holding the text model's config (multimodal wrappers)."""

    def model_cls(self) -> type:
        module, _, cls = self.model_class.partition(":")
        return getattr(importlib.import_module(module), cls)

    def hf_name(self, name: str) -> str | None:
        """A checkpoint tensor name in the text model's HF naming, or None to skip it."""
        for old, new in self.hf_prefixes:
            if name.startswith(old):
                return new + name[len(old):] if new else None
        return name


_LLAMA = "lserve.model.llama:LlamaForCausalLM"
_GEMMA3_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", ""),
    ("vision_tower.", ""),
    ("model.multi_modal_projector.", ""),
    ("multi_modal_projector.", ""),
)

REGISTRY: dict[str, ArchSpec] = {spec.name: spec for spec in (
    ArchSpec("LlamaForCausalLM", _LLAMA, ("llama",), "llama", gguf_permuted_rope=True),
    ArchSpec("MistralForCausalLM", _LLAMA, ("mistral",), "mistral", gguf_permuted_rope=True),
    ArchSpec("Qwen2ForCausalLM", _LLAMA, ("qwen2",), "qwen2"),
    ArchSpec("Qwen3ForCausalLM", "lserve.model.qwen3:Qwen3ForCausalLM", ("qwen3",), "qwen3",
             gguf_layer_names={**_LLAMA_GGUF_LAYER, **_QK_NORM_GGUF}),
    ArchSpec("Gemma3ForCausalLM", "lserve.model.gemma3:Gemma3ForCausalLM", ("gemma3_text",), "gemma3",
             gguf_layer_names=_GEMMA3_GGUF_LAYER, gguf_norm_offset=-1.0),
    ArchSpec("Gemma3ForConditionalGeneration", "lserve.model.gemma3:Gemma3ForCausalLM", ("gemma3",),
             hf_prefixes=_GEMMA3_TEXT_PREFIXES, text_config_key="text_config"),
)}


def supported_architectures() -> tuple[str, ...]:
    return tuple(REGISTRY)


def _unsupported(what: str) -> ModelLoadError:
    return ModelLoadError(f"unsupported architecture {what}; lserve supports {', '.join(REGISTRY)}")


def spec_for(architecture: str) -> ArchSpec:
    """The entry of an HF architecture name; one clear error naming the supported ones otherwise."""
    spec = REGISTRY.get(architecture)
    if spec is None:
        raise _unsupported(repr(architecture))
    return spec


def spec_for_hf_config(cfg: dict[str, Any]) -> ArchSpec:
    """The entry for a config.json: its first `architectures` entry, else its `model_type`."""
    archs = cfg.get("architectures") or []
    if archs:
        return spec_for(str(archs[0]))
    model_type = cfg.get("model_type", "")
    for spec in REGISTRY.values():
        if model_type in spec.hf_model_types:
            return spec
    raise _unsupported(f"(model_type {model_type!r})")


def spec_for_gguf(gguf_arch: Any) -> ArchSpec:
    for spec in REGISTRY.values():
        if spec.gguf_arch is not None and spec.gguf_arch == gguf_arch:
            return spec
    supported = ", ".join(s.gguf_arch for s in REGISTRY.values() if s.gguf_arch)
    raise ModelLoadError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {supported}")
