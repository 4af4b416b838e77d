"""What a result was measured on, and the model facts both tools need before loading any weights."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from lserve.config import EngineConfig


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's name for it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_description(device: str = "auto") -> str:
    """`NVIDIA H200 (cuda), torch 2.11` or `CPU: AMD EPYC ... (2 cores), torch 2.13`."""
    import torch

    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        where = f"{torch.cuda.get_device_name(0)} (cuda)"
    else:
        where = f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{where}, torch {torch.__version__}"


@dataclass(frozen=True)
class ModelInfo:
    """A model's identity, shape and length limit, read from its config without loading weights."""

    name: str
    path: str
    load_format: str
    arch: Any
    """`lserve.model.config.ArchConfig`."""
    limit: int
    """The longest prompt + output any of the configurations accepts."""

    def shape(self) -> str:
        a = self.arch
        return (f"{a.num_layers} layers, {a.num_heads} query / {a.num_kv_heads} KV heads, head dim {a.head_dim}, "
                f"hidden {a.hidden_size}, vocab {a.vocab_size}")


def model_info(base_kwargs: dict[str, Any], overrides: list[dict[str, Any]]) -> ModelInfo:
    """Resolve the model once; its length limit is the smallest over all configurations."""
    from lserve.model.loader import read_arch_config, resolve_source

    config = EngineConfig.from_kwargs(**base_kwargs)
    source = resolve_source(config.model.model, config.model.load_format)
    arch, _ = read_arch_config(source)
    native = arch.max_position_embeddings  # sliding-window layers do not cap it (their ring pool)
    limits = []
    for extra in overrides or [{}]:
        wanted = {**base_kwargs, **extra}.get("max_model_len")
        if wanted is None:
            limits.append(native)
        else:
            limits.append(wanted if source.load_format == "dummy" else min(wanted, native))
    return ModelInfo(source.name, str(source.path), source.load_format, arch, min(limits))


def load_tokenizer_for(base_kwargs: dict[str, Any]) -> Any:
    """The tokenizer of the configured model (None for dummy models without tokenizer files)."""
    from lserve.engine.tokenizer import load_tokenizer
    from lserve.model.loader import resolve_source

    config = EngineConfig.from_kwargs(**base_kwargs)
    return load_tokenizer(resolve_source(config.model.model, config.model.load_format))
