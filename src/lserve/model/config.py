"""Architecture description shared by every loader (HF config.json, GGUF metadata, dummy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lserve.errors import ModelLoadError
from lserve.model.registry import spec_for, spec_for_hf_config

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class ArchConfig:
    """Shape and numerics of a decoder (the fields every registered architecture shares, and the
    few that some of them add: per-layer sliding windows, Gemma's attention scale and local RoPE)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str | None = None
    layer_types: tuple[str, ...] | None = None
    """Per layer "sliding_attention" (a window of `sliding_window` tokens) or "full_attention";
    None: every layer slides when `sliding_window` is set (Mistral), else none."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is this to the -1/2 (Gemma); None: head_dim to the -1/2."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding layers when it differs from the full layers' (Gemma 3)."""
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        spec_for(self.architecture)  # a clear error naming the supported architectures
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {SLIDING, FULL}:
                raise ModelLoadError(f"layer_types must give {self.num_layers} entries of {SLIDING!r} or {FULL!r}")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ModelLoadError(f"unsupported hidden activation {self.hidden_act!r}; supported: silu, gelu_pytorch_tanh")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"unsupported rope scaling {self.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the sliding window W (key j is visible to query i when i - j < W), or None
        for attention over the whole context."""
        if not self.sliding_window:
            return (None,) * self.num_layers
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        """Layers that attend to the whole context (where streaming heads and page selection apply)."""
        return tuple(i for i, w in enumerate(self.layer_windows) if w is None)

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a Hugging Face `config.json` dictionary."""
        spec = spec_for_hf_config(cfg)  # before reading fields other families name differently
        arch = spec.name
        if spec.text_config_key is not None:  # a multimodal wrapper: its text model's config
            cfg = {**(cfg.get(spec.text_config_key) or {}), "torch_dtype": cfg.get("torch_dtype", cfg.get("dtype"))}
        try:
            if arch.startswith("Gemma3"):
                return cls._from_gemma3(arch, cfg)
            hidden = int(cfg["hidden_size"])
            num_heads = int(cfg["num_attention_heads"])
            rope_params = dict(cfg.get("rope_parameters") or {})
            rope_scaling = cfg.get("rope_scaling") or rope_params or None
            rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_scaling is not None:
                rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            sliding = cfg.get("sliding_window")
            layer_types = cfg.get("layer_types")
            if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
                if not cfg.get("use_sliding_window", False):
                    sliding = None
                elif layer_types is None:  # transformers' rule: layers from max_window_layers on slide
                    first = int(cfg.get("max_window_layers", 28))
                    layer_types = [SLIDING if i >= first else FULL for i in range(int(cfg["num_hidden_layers"]))]
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                layer_types=tuple(layer_types) if layer_types and sliding else None,
                hidden_act=str(cfg.get("hidden_act", "silu")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc

    @classmethod
    def _from_gemma3(cls, arch: str, cfg: dict[str, Any]) -> ArchConfig:
        """Gemma 3 configs leave many fields to transformers' defaults and have had several
        spellings (rope_local_base_freq / rope_parameters per layer type, sliding_window_pattern /
        layer_types): transformers' own config class reads them."""
        from transformers import Gemma3TextConfig

        known = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
        try:
            t = Gemma3TextConfig(**known)
        except Exception as exc:  # noqa: BLE001 (transformers validates with several exception types)
            raise ModelLoadError(f"config.json is not a valid Gemma 3 text config: {exc}") from exc
        if getattr(t, "attn_logit_softcapping", None):
            raise ModelLoadError("attention logit soft-capping (attn_logit_softcapping) is not supported")
        if getattr(t, "use_bidirectional_attention", False):
            raise ModelLoadError("bidirectional Gemma 3 models (use_bidirectional_attention) are not supported")
        rope = t.rope_parameters
        full, local = dict(rope["full_attention"]), dict(rope["sliding_attention"])
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"unsupported rope scaling {local['rope_type']!r} on Gemma 3's sliding layers")
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        eos = t.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(t.vocab_size),
            hidden_size=int(t.hidden_size),
            intermediate_size=int(t.intermediate_size),
            num_layers=int(t.num_hidden_layers),
            num_heads=int(t.num_attention_heads),
            num_kv_heads=int(t.num_key_value_heads),
            head_dim=int(t.head_dim),
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=float(full["rope_theta"]),
            max_position_embeddings=int(t.max_position_embeddings),
            rope_scaling=scaling if scaling.get("rope_type", "default") != "default" else None,
            tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", True)),
            attention_bias=bool(t.attention_bias),
            sliding_window=int(t.sliding_window) if t.sliding_window else None,
            bos_token_id=t.bos_token_id,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            layer_types=tuple(t.layer_types),
            query_pre_attn_scalar=float(t.query_pre_attn_scalar),
            rope_local_theta=float(local["rope_theta"]),
            final_logit_softcapping=t.final_logit_softcapping,
            hidden_act=str(t.hidden_activation),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per element byte (multiply by dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
