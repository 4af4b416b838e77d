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
from lserve.model.config import ArchConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_PERMUTED_ROPE = ("llama", "mistral")
_LAYER_NAMES = {
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
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path) -> Any:
    """A reader for the file as it is now (cached by path, size and modification time)."""
    stat = path.stat()
    return _cached_reader(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _cached_reader(path: Path, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
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
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    try:
        hidden = int(meta[f"{arch}.embedding_length"])
        num_heads = int(meta[f"{arch}.attention.head_count"])
        vocab = meta.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        cfg = ArchConfig(
            architecture=_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_layers=int(meta[f"{arch}.block_count"]),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(sorted({int(e) for e in eos})),
        )
    except KeyError as exc:
        raise ModelLoadError(f"GGUF file {path} lacks metadata {exc}") from exc
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(_dequantize(tensors["rope_freqs.weight"]).reshape(-1).copy())
    return cfg, factors


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


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name; None for tensors that are not weights (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def iter_gguf_tensors(path: Path, cfg: ArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every weight, dequantised and un-permuted."""
    reader = _reader(path)
    permute = reader.fields["general.architecture"].contents() in _PERMUTED_ROPE
    for tensor in tqdm(reader.tensors, desc=f"Loading {path.name}", leave=False, disable=None):
        name = hf_name(tensor.name)
        if name is None:
            continue
        w = _dequantize(tensor)
        if permute and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, cfg.num_heads)
        elif permute and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
