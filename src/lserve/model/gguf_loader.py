"""GGUF files: architecture from metadata, weights dequantised with the `gguf` package.

llama.cpp's converter permutes the rows of q and k for the `llama` architecture (it uses
interleaved rotary pairs); we undo that so the weights fit our rotate-half rotary embedding.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lserve.errors import ModelLoadError
from lserve.model.config import FULL, SLIDING, ArchConfig
from lserve.model.registry import ArchSpec, spec_for, spec_for_gguf

GEMMA3_SLIDING_PATTERN = 6
"""llama.cpp's Gemma 3: every sixth layer attends globally, the others slide (not in the metadata)."""
GEMMA3_LOCAL_ROPE_THETA = 10000.0

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path) -> Any:
    """A reader for the file as it is now (cached by path, size and modification time)."""
    stat = path.stat()
    return _cached_reader(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1)
def reader_class() -> type:
    """The GGUF reader lserve opens files with: `gguf.GGUFReader` over a plain ndarray view."""
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        """`GGUFReader` over a plain ndarray view of its memory map. The reader slices its `data`
        array once or twice per element of every metadata array while it builds its fields, and
        each slice of an `np.memmap` runs numpy's Python-level `__array_finalize__`, which made
        opening a 262K-token vocabulary (Gemma 3) several times slower than on a plain view
        (docs/benchmarks.md). Same fields, same tensor bytes; the view keeps the map alive. Only
        the assignment of `data` is intercepted."""

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


@lru_cache(maxsize=4)
def _cached_reader(path: Path, size: int, mtime_ns: int) -> Any:
    try:
        return reader_class()(str(path))
    except Exception as exc:  # the gguf package raises ValueError, struct.error, IndexError, ...
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (large arrays such as the vocabulary are skipped)."""
    out: dict[str, Any] = {}
    for key, fld in _reader(path).fields.items():
        if len(fld.data) > 64:
            continue
        try:
            out[key] = fld.contents()
        except Exception:  # noqa: BLE001 (a field of an unknown type is not needed)
            continue
    return out


def read_gguf_config(path: Path) -> tuple[ArchConfig, torch.Tensor | None]:
    """ArchConfig from GGUF metadata, and llama3's rope frequency factors if the file has them."""
    reader = _reader(path)
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    spec = spec_for_gguf(arch)
    tensors = {t.name: t for t in reader.tensors}
    try:
        hidden = int(meta[f"{arch}.embedding_length"])
        num_heads = int(meta[f"{arch}.attention.head_count"])
        vocab = meta.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        num_layers = int(meta[f"{arch}.block_count"])
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
        window = meta.get(f"{arch}.attention.sliding_window")
        extra = _gemma3_fields(num_layers, hidden, num_heads, head_dim) if arch == "gemma3" else {}
        cfg = ArchConfig(
            architecture=spec.name,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(sorted({int(e) for e in eos})),
            sliding_window=int(window) if window else None,
            **extra,
        )
    except KeyError as exc:
        raise ModelLoadError(f"GGUF file {path} lacks metadata {exc}") from exc
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(_dequantize(tensors["rope_freqs.weight"]).reshape(-1).copy())
    return cfg, factors


def _gemma3_fields(num_layers: int, hidden: int, num_heads: int, head_dim: int) -> dict[str, Any]:
    """What a Gemma 3 GGUF leaves out and llama.cpp fixes in code: the layer pattern, the local
    RoPE base, the activation and the attention scale (hidden / heads for the 27B model, whose
    head_dim differs from it; head_dim elsewhere)."""
    types = tuple(FULL if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else SLIDING for i in range(num_layers))
    scalar = hidden // num_heads if num_layers == 62 else head_dim
    return dict(layer_types=types, rope_local_theta=GEMMA3_LOCAL_ROPE_THETA, hidden_act="gelu_pytorch_tanh",
                query_pre_attn_scalar=float(scalar))


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return dequantize(tensor.data, tensor.tensor_type)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot dequantise GGUF tensor {tensor.name!r}: {exc}") from exc


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, spec: ArchSpec | None = None) -> str | None:
    """GGUF tensor name -> Hugging Face name (by the architecture's table, Llama's by default);
    None for tensors that are not weights (rope_freqs)."""
    layer_names = (spec or spec_for("LlamaForCausalLM")).gguf_layer_names
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def iter_gguf_tensors(path: Path, cfg: ArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every weight, dequantised and un-permuted."""
    reader = _reader(path)
    spec = spec_for_gguf(reader.fields["general.architecture"].contents())
    permute = spec.gguf_permuted_rope
    for tensor in tqdm(reader.tensors, desc=f"Loading {path.name}", leave=False, disable=None):
        name = hf_name(tensor.name, spec)
        if name is None:
            continue
        w = _dequantize(tensor)
        if spec.gguf_norm_offset and tensor.name.endswith("norm.weight"):
            w = w + np.float32(spec.gguf_norm_offset)
        if permute and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, cfg.num_heads)
        elif permute and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
