"""Engine configuration: one tree of frozen dataclasses, validated on construction.

Every field carries a one-line help text in its metadata; the CLI builds its flags from these
fields (`lserve.cli`), so a flag cannot drift from the field it sets. `LLM(**kwargs)` takes the
same names flat and `EngineConfig.from_kwargs` sorts them into the groups.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
LoadFormat = Literal["auto", "hf", "gguf", "dummy"]
AttentionBackendName = Literal["auto", "torch", "triton"]
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3"]
Quantization = Literal["fp8"]
DEFAULT_PAGE_SIZE = 64
"""Tokens per KV page where neither the setting nor a model pattern chooses."""

PageScoreName = Literal["auto", "quest", "midrange", "rope_channels", "label_channels", "rope_mass"]
PAGE_SCORE_NAMES = ("auto", "quest", "midrange", "rope_channels", "label_channels", "rope_mass")
LabelDType = Literal["auto", "fp8"]
LABEL_DTYPES = ("auto", "fp8")


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_page_size(value: Any) -> None:
    """A KV page size: a power of two from 16 to 128 tokens (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value > 128 or value & (value - 1):
        raise ValueError(f"page_size must be a power of two from 16 to 128, got {value!r}")


def _check_int(name: str, value: Any, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how."""

    model: str | None = _field(
        None, "Hugging Face folder, .gguf file, gemma-3-270m (the embedded Gemma 3 270M) or dummy:NAME; "
        "default: embedded SmolLM2-135M-Instruct"
    )
    dtype: DType = _field("auto", "weight and activation dtype (auto: float32 on CPU, bfloat16 on GPU)")
    load_format: LoadFormat = _field("auto", "auto (by path), hf, gguf, or dummy (random weights)")
    max_model_len: int | None = _field(None, "longest prompt + output in tokens (default: the model's)")
    device: Device = _field("auto", "cpu, cuda or auto (cuda when available)")
    seed: int = _field(0, "seed for dummy weights and for requests without their own seed")
    enforce_eager: bool = _field(False, "run decode steps without CUDA graphs (graphs are used on CUDA only)")
    quantization: Quantization | None = _field(
        None, "fp8: the decoder layers' linear weights quantized to E4M3 at load time (a scale per output "
        "channel; activations quantized per token; products by torch._scaled_mm, which needs a GPU of compute "
        "capability 8.9+ or a CPU torch that has it). Embeddings and the LM head keep the model's dtype")

    def __post_init__(self) -> None:
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        _check_choice("quantization", self.quantization, (None, "fp8"))
        _check_choice("dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        _check_choice("load_format", self.load_format, ("auto", "hf", "gguf", "dummy"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_int("max_model_len", self.max_model_len, 1, allow_none=True)
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a path string or None, got {type(self.model).__name__}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    page_size: int | None = _field(
        None, f"tokens per KV page (a power of two, 16..128; default {DEFAULT_PAGE_SIZE}, or the model pattern's "
        "calibrated page size when page selection takes the pattern's choice: token_budget > 0, page_score=auto)")
    num_kv_pages: int | None = _field(None, "number of KV pages (default: sized from free memory)")
    gpu_memory_utilization: float = _field(
        0.9, "share of the GPU's total memory this engine may use (vLLM's meaning, per engine): weights, "
        "activations and decode graphs (measured at start-up) and the KV cache, which gets the rest, never more "
        "than is free. GPU only; kv_cache_memory_fraction, kv_cache_memory_bytes or num_kv_pages replace it"
    )
    kv_cache_memory_fraction: float | None = _field(
        None, "share of free memory after loading weights for the KV cache, unprofiled (default on a GPU: "
        "gpu_memory_utilization; on a CPU 0.5, at most 4 GiB)"
    )
    kv_cache_memory_bytes: int | None = _field(
        None, "bytes for the KV cache, ring pool and page-selection labels included (instead of a share of "
        "free memory)"
    )
    enable_prefix_caching: bool | None = _field(
        None, "keep full KV pages after their request ends and reuse them for later prompts that start "
        "with the same tokens (vLLM's name; LRU eviction). Unset: on unless streaming heads or a sliding-window "
        "model's window pool are in use; when on, those keep their whole history in the paged pool (exact hits, "
        "their windows still apply, their memory savings are given up)"
    )
    kv_cache_dtype: KVCacheDType = _field(
        "auto", "what K and V are stored in: auto (the model's dtype) or fp8 / fp8_e4m3 (E4M3 with a scale per "
        "token and KV head: about half the memory of bfloat16; docs/sparsity.md)")
    window_pool: bool = _field(
        True, "keep sliding-window layers in a constant-size ring per request (off: in the paged pool, "
        "growing with the context, as a baseline for comparisons)"
    )

    def __post_init__(self) -> None:
        if self.page_size is not None:
            check_page_size(self.page_size)
        _check_int("num_kv_pages", self.num_kv_pages, 1, allow_none=True)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, ("auto", "fp8", "fp8_e4m3"))
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        frac = self.kv_cache_memory_fraction
        if frac is not None and not (isinstance(frac, (int, float)) and 0.0 < frac <= 1.0):
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {frac!r}")
        _check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, allow_none=True)
        if frac is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError("give kv_cache_memory_bytes or kv_cache_memory_fraction, not both")
        for name in ("enable_prefix_caching", "window_pool"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "enable_prefix_caching"):
                raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching and chunked prefill."""

    max_num_seqs: int = _field(64, "most requests running in one step")
    max_num_batched_tokens: int = _field(8192, "token budget of one step; longer prefills are chunked to fit")
    async_scheduling: bool = _field(
        True, "schedule and launch each step before reading the previous step's tokens, so that the "
        "host's work overlaps the GPU's (a request that stops computes one extra token, dropped)")

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {self.async_scheduling!r}")


@dataclass(frozen=True)
class SparseConfig:
    """Unified block-sparse attention (LServe). Zero turns each kind of sparsity off."""

    streaming_sparsity: float = _field(0.0, "fraction of KV heads that are streaming heads (0 = off)")
    attn_pattern: str | None = _field(None, "head pattern file (DuoAttention TSV or lserve pattern)")
    prefill_sink_tokens: int = _field(128, "streaming heads: sink tokens in prefill")
    prefill_local_tokens: int = _field(8192, "streaming heads: local window in prefill")
    decode_sink_tokens: int = _field(128, "streaming heads: sink tokens in decode")
    decode_local_tokens: int = _field(256, "streaming heads: local window in decode")
    token_budget: int = _field(0, "dense heads in decode: tokens of selected KV pages (0 = off)")
    logical_page_size: int = _field(16, "tokens per logical page for page statistics")
    selector_interval: int | None = _field(
        None, "decode steps between page re-selections (default: the model pattern's calibrated value with "
        "page_score=auto, else 4)")
    num_dense_layers: int = _field(0, "with token_budget: the first N layers read every page (Quest keeps 2)")
    page_score: PageScoreName = _field(
        "auto", "how pages are ranked: auto (the model pattern's calibrated choice, else rope_channels), quest, "
        "midrange, rope_channels, label_channels or rope_mass (docs/sparsity.md)")
    score_channels: int | None = _field(
        None, "key channels per KV head kept per token for the channel scores (default: the model pattern's "
        "calibrated value with page_score=auto, else 16 for rope_mass and 8 for the others)")
    label_dtype: LabelDType | None = _field(
        None, "what the channel scores' per-token key labels are stored in: auto (the model's dtype) or fp8 "
        "(E4M3 with a scale per token and KV head: twice the channels in about the same bytes; default: the model "
        "pattern's choice with page_score=auto, else auto)")
    selection_top_p: float | None = _field(
        None, "keep each head's best pages until their estimated share of attention reaches p (within "
        "token_budget; off by default)")
    selection_min_tokens: int = _field(256, "with selection_top_p: the fewest tokens of selected pages")
    selection_local_tokens: int | None = _field(
        None, "with token_budget: every selecting head also reads the first page (the attention sink) and the "
        "pages of its last N tokens before the newest page, out of the same budget (0 = off; default: the model "
        "pattern's calibrated value with page_score=auto when the budget has room for it, else 0)")

    def __post_init__(self) -> None:
        s = self.streaming_sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"streaming_sparsity must be in [0, 1], got {s!r}")
        for name in ("prefill_sink_tokens", "prefill_local_tokens", "decode_sink_tokens", "decode_local_tokens"):
            _check_int(name, getattr(self, name), 1)
        _check_int("token_budget", self.token_budget, 0)
        _check_int("selector_interval", self.selector_interval, 1, allow_none=True)
        _check_int("num_dense_layers", self.num_dense_layers, 0)
        lps = self.logical_page_size
        if isinstance(lps, bool) or not isinstance(lps, int) or lps < 1 or lps & (lps - 1):
            raise ValueError(f"logical_page_size must be a power of two, got {lps!r}")
        if self.attn_pattern is not None and not isinstance(self.attn_pattern, str):
            raise ValueError("attn_pattern must be a path string or None")
        _check_choice("page_score", self.page_score, PAGE_SCORE_NAMES)
        r = self.score_channels
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 2 or r & (r - 1)):
            raise ValueError(f"score_channels must be a power of two >= 2, got {r!r}")
        _check_choice("label_dtype", self.label_dtype, (None, *LABEL_DTYPES))
        p = self.selection_top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"selection_top_p must be in (0, 1] or None, got {p!r}")
        _check_int("selection_min_tokens", self.selection_min_tokens, 1)
        if p is not None and not self.token_budget:
            raise ValueError("selection_top_p needs token_budget > 0 (the most tokens a selection may read)")
        _check_int("selection_local_tokens", self.selection_local_tokens, 0, allow_none=True)
        if self.selection_local_tokens and p is not None:
            raise ValueError("selection_local_tokens does not combine with selection_top_p (a top-p selection "
                             "keeps the first page already; its local window is not built)")

    @property
    def uses_streaming_heads(self) -> bool:
        return self.streaming_sparsity > 0 or self.attn_pattern is not None

    @property
    def uses_page_selection(self) -> bool:
        return self.token_budget > 0


@dataclass(frozen=True)
class ParallelConfig:
    """Running one model over several processes."""

    tensor_parallel_size: int = _field(
        1, "processes (one per GPU) that each hold a slice of every layer's heads and MLP, run together "
        "over torch.distributed (NCCL on GPUs, gloo on CPUs)")

    def __post_init__(self) -> None:
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; `LLM(**kwargs)` builds one from flat keyword arguments."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention_backend: AttentionBackendName = _field("auto", "torch, triton, or auto (triton on GPU)")

    def __post_init__(self) -> None:
        _check_choice("attention_backend", self.attention_backend, ("auto", "torch", "triton"))
        budget, page = self.sparse.token_budget, self.cache.page_size
        if page is None:
            return  # checked again once the engine has chosen the page size (`with_page_size`)
        if budget and budget < 2 * page:
            raise ValueError(
                f"token_budget ({budget}) must be 0 (off) or at least two pages ({2 * page} "
                f"tokens at page_size {page}): the newest page plus one selected page"
            )
        if self.sparse.logical_page_size > page:
            raise ValueError(f"logical_page_size ({self.sparse.logical_page_size}) must not exceed page_size ({page})")

    def with_page_size(self, page_size: int) -> EngineConfig:
        """This config with `page_size` set (validated against the sparse settings)."""
        return dataclasses.replace(self, cache=dataclasses.replace(self.cache, page_size=page_size))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Sort flat keyword arguments (`LLM(page_size=32, ...)`) into the config groups."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        top: dict[str, Any] = {}
        for key, value in kwargs.items():
            group = FIELD_GROUP.get(key)
            if group is None:
                hint = difflib.get_close_matches(key, list(FIELD_GROUP), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise TypeError(f"unknown engine argument {key!r}{extra}")
            (top if group == "" else groups[group])[key] = value
        built = {name: GROUPS[name](**values) for name, values in groups.items()}
        return cls(**built, **top)

    def to_flat_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attention_backend": self.attention_backend}
        for name in GROUPS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "sparse": SparseConfig,
    "parallel": ParallelConfig,
}


def engine_fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    """(group, field) for every flat engine argument, in declaration order; "" is the top level."""
    out = [(group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    out += [("", f) for f in dataclasses.fields(EngineConfig) if f.name not in GROUPS]
    return out


FIELD_GROUP: dict[str, str] = {f.name: group for group, f in engine_fields()}
