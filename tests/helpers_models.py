"""Tiny random Hugging Face models (Llama, Qwen2, Mistral, Qwen3, Gemma 3) and GGUF files for the
loader and model-family tests (CPU only, float32)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lserve.model.loader import load_model, read_arch_config, resolve_source

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=300,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


GEMMA3_TINY = dict(
    num_hidden_layers=6,
    sliding_window_pattern=3,  # layers 2 and 5 global, the others sliding (transformers: (i + 1) % 3 == 0)
    head_dim=24,  # heads * head_dim (96) != hidden (64), as in the real models
    query_pre_attn_scalar=16,  # != head_dim: a scale of head_dim**-0.5 would be wrong
    sliding_window=12,
    rope_theta=5000.0,  # global layers
    rope_local_base_freq=100.0,  # sliding layers
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    pad_token_id=0,
)
"""A tiny Gemma 3 text model: both kinds of layers, a window short sequences cross, distinct thetas."""


def hf_config(family: str = "llama", **overrides: Any) -> Any:
    """A tiny transformers config of `family` ('llama', 'qwen2', 'mistral', 'qwen3' or 'gemma3').

    Mistral and Qwen2 have no sliding window unless asked (`sliding_window=W`; Qwen2 also
    `use_sliding_window=True`); Gemma 3 always has its interleaved local/global layers."""
    import transformers

    kwargs: dict[str, Any] = {**TINY, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(**kwargs)
    if family == "qwen2":
        kwargs.setdefault("use_sliding_window", False)
        return transformers.Qwen2Config(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
        return transformers.MistralConfig(**kwargs)
    if family == "qwen3":
        kwargs.setdefault("use_sliding_window", False)
        kwargs.setdefault("head_dim", 16)
        return transformers.Qwen3Config(**kwargs)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**{**TINY, **GEMMA3_TINY, **overrides})
    raise ValueError(family)


def hf_model(config: Any, seed: int = 0) -> Any:
    """transformers model for `config` with O(1)-scale random weights (norms and biases too), float32, eval."""
    import transformers

    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "gemma3_text": transformers.Gemma3ForCausalLM,
    }[config.model_type]
    # Gemma's RMSNorm scales by (1 + weight): its weights are centred on 0, not 1.
    norm_centre = 0.0 if config.model_type == "gemma3_text" else 1.0
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head/embedding appears once
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(norm_centre + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                # Gemma multiplies embeddings by sqrt(hidden): keep its residual stream O(1) too, or
                # the (tied) head just copies the current token
                p.copy_(noise / math.sqrt(config.hidden_size) if config.model_type == "gemma3_text" else noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def save_hf(model: Any, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return folder


def save_word_tokenizer(folder: Path, vocab_size: int = TINY["vocab_size"], bos: int = TINY["bos_token_id"],
                        eos: int = TINY["eos_token_id"]) -> Path:
    """A word-level tokenizer of `vocab_size` tokens `<t0>`..`<tN>` in `folder`, so that the engine can
    serve a tiny random model (prompts given as token ids; its output is detokenised)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", bos_token=f"<t{bos}>",
                                   eos_token=f"<t{eos}>")
    fast.save_pretrained(str(folder))
    return folder


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Plain causal attention over the step's own tokens: q (T,Hq,D), k/v (T,Hkv,D) -> (T,Hq,D)."""
    group = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return out.transpose(0, 1).contiguous()


def reference_attention(config: Any) -> Any:
    """The tests' own attention for a model of `config` (an lserve ArchConfig): causal, restricted to
    each layer's sliding window (`config.layer_windows[layer_idx]`: key j is visible to query i iff
    j <= i and i - j < W, transformers' convention; None: every earlier key), with the softmax scale
    `config.attention_scale` (head_dim**-0.5 except for Gemma 3). Positions are the step's own
    token indices: the step is the whole sequence."""
    windows, scale = config.layer_windows, config.attention_scale

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        t = q.shape[0]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        mask = j <= i
        window = windows[layer_idx]
        if window is not None:
            mask = mask & (i - j < window)
        group = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1)
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1)
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return out.transpose(0, 1).contiguous()

    return attention


def load_lserve(path: Path | str, load_format: str = "auto", dtype: torch.dtype = torch.float32,
                seed: int = 0, tp: Any = None) -> torch.nn.Module:
    """lserve's model from a folder or GGUF file (`tp`: a `TensorParallel` rank's shard)."""
    from lserve.model.parallel import SINGLE

    source = resolve_source(str(path), load_format)
    arch, factors = read_arch_config(source)
    return load_model(source, arch, factors, dtype, torch.device("cpu"), seed=seed, tp=tp or SINGLE)


@torch.no_grad()
def lserve_logits(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(ids.shape[0])
    hidden = model(ids, positions, reference_attention(model.config))
    return model.compute_logits(hidden)


@torch.no_grad()
def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None]).logits[0].float()


def random_ids(n: int, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- GGUF -------------------------------------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rotate-half rows -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_llama3_rope_factors(head_dim: int, theta: float, rope: dict[str, Any]) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for Llama 3.1 scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # Qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def write_llama_gguf(
    model: Any,
    path: Path,
    quant: Any = None,
    with_vocab_list: bool = True,
    rope_factors: np.ndarray | None = None,
    skip: tuple[str, ...] = (),
    arch: str = "llama",
) -> Path:
    """Write a transformers Llama (or Qwen2, arch='qwen2') model as a llama.cpp-style GGUF.

    `quant`: a gguf.GGMLQuantizationType applied to the 2-D weights (None keeps F32). For arch
    'llama' q/k rows are permuted as llama.cpp's converter does; 'qwen2' is written unpermuted.
    """
    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    permute = arch == "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_bos_token_id(int(cfg.bos_token_id))
    w.add_eos_token_id(int(cfg.eos_token_id))
    if with_vocab_list:
        w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    else:
        w.add_vocab_size(cfg.vocab_size)

    tensors: list[tuple[str, np.ndarray]] = []
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            parts = name.split(".", 3)  # model, layers, N, rest
            if parts[1] != "layers" or parts[3] not in _GGUF_LAYER:
                continue
            gname = f"blk.{parts[2]}.{_GGUF_LAYER[parts[3]]}"
            if not permute:
                pass
            elif parts[3] in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                arr = llamacpp_permute(arr, n_head)
            elif parts[3] in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
                arr = llamacpp_permute(arr, n_kv if n_kv != n_head else n_head)
        tensors.append((gname, arr))
    if rope_factors is not None:
        tensors.append(("rope_freqs.weight", rope_factors))
    for gname, arr in tensors:
        if gname in skip:
            continue
        if quant is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, quant), raw_shape=None, raw_dtype=quant)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def has_fp8_matmul(device: torch.device) -> bool:
    """Whether `quantization="fp8"` can run on `device` (torch has FP8 products with per-row scales there)."""
    from lserve.errors import NotSupportedError
    from lserve.ops.fp8_linear import check_fp8_matmul

    try:
        check_fp8_matmul(device, torch.float32)
    except NotSupportedError:
        return False
    return True
