"""EngineConfig: flat kwargs into groups, validation, immutability; the CLI flags built from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lserve.cli import add_engine_flags, engine_kwargs
from lserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SparseConfig,
    engine_fields,
)


def test_from_kwargs_sorts_into_groups() -> None:
    cfg = EngineConfig.from_kwargs(
        page_size=32, num_kv_pages=100, dtype="float32", device="cpu", max_num_seqs=8,
        max_num_batched_tokens=512, streaming_sparsity=0.5, token_budget=256, logical_page_size=16,
        attention_backend="torch", load_format="dummy", seed=3,
    )
    assert cfg.cache == CacheConfig(page_size=32, num_kv_pages=100)
    assert cfg.model == ModelConfig(dtype="float32", device="cpu", load_format="dummy", seed=3)
    assert cfg.scheduler == SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)
    assert cfg.sparse == SparseConfig(streaming_sparsity=0.5, token_budget=256, logical_page_size=16)
    assert cfg.attention_backend == "torch"
    assert cfg.sparse.uses_streaming_heads and cfg.sparse.uses_page_selection


def test_from_kwargs_defaults() -> None:
    assert EngineConfig.from_kwargs() == EngineConfig()
    cfg = EngineConfig()
    assert not cfg.sparse.uses_streaming_heads and not cfg.sparse.uses_page_selection


def test_unknown_kwarg_suggests_the_close_name() -> None:
    with pytest.raises(TypeError, match=r"page_sise.*did you mean 'page_size'"):
        EngineConfig.from_kwargs(page_sise=32)
    with pytest.raises(TypeError, match="unknown engine argument 'zzzz'") as info:
        EngineConfig.from_kwargs(zzzz=1)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,field_name",
    [
        ({"page_size": 33}, "page_size"),
        ({"page_size": 8}, "page_size"),
        ({"page_size": 512}, "page_size"),
        ({"page_size": 256}, "page_size"),
        ({"page_size": 32.0}, "page_size"),
        ({"page_size": True}, "page_size"),
        ({"num_kv_pages": 0}, "num_kv_pages"),
        ({"kv_cache_memory_fraction": 0}, "kv_cache_memory_fraction"),
        ({"kv_cache_memory_fraction": 0.0}, "kv_cache_memory_fraction"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"streaming_sparsity": -0.1}, "streaming_sparsity"),
        ({"streaming_sparsity": 1.5}, "streaming_sparsity"),
        ({"prefill_sink_tokens": 0}, "prefill_sink_tokens"),
        ({"prefill_local_tokens": 0}, "prefill_local_tokens"),
        ({"decode_sink_tokens": 0}, "decode_sink_tokens"),
        ({"decode_local_tokens": 0}, "decode_local_tokens"),
        ({"token_budget": -1}, "token_budget"),
        ({"logical_page_size": 3}, "logical_page_size"),
        ({"logical_page_size": 0}, "logical_page_size"),
        ({"selector_interval": 0}, "selector_interval"),
        ({"page_size": 16, "logical_page_size": 32}, "logical_page_size"),
        ({"dtype": "fp8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"load_format": "pt"}, "load_format"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"seed": -1}, "seed"),
        ({"model": 3}, "model"),
        ({"attn_pattern": 3}, "attn_pattern"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        EngineConfig.from_kwargs(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 16},
        {"page_size": 128},
        {"kv_cache_memory_fraction": 1.0},
        {"kv_cache_memory_fraction": 0.01},
        {"streaming_sparsity": 0.0},
        {"streaming_sparsity": 1.0},
        {"token_budget": 0},
        {"logical_page_size": 64, "page_size": 64},
        {"logical_page_size": 1},
        {"max_model_len": 1, "seed": 0, "num_kv_pages": 1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    cfg = EngineConfig.from_kwargs(**kwargs)
    flat = cfg.to_flat_dict()
    for key, value in kwargs.items():
        assert flat[key] == value


def test_configs_are_frozen() -> None:
    cfg = EngineConfig.from_kwargs(page_size=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.attention_backend = "torch"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache = CacheConfig()  # type: ignore[misc]
    for group in (cfg.model, cfg.cache, cfg.scheduler, cfg.sparse):
        name = dataclasses.fields(group)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(group, name, getattr(group, name))
    assert cfg.cache.page_size == 32


def test_to_flat_dict_round_trips() -> None:
    cfg = EngineConfig.from_kwargs(
        page_size=128, kv_cache_memory_fraction=0.25, dtype="bfloat16", max_model_len=4096,
        max_num_batched_tokens=1024, streaming_sparsity=0.25, attn_pattern="p.tsv", decode_local_tokens=512,
        token_budget=1024, logical_page_size=32, selector_interval=2, attention_backend="triton",
        model="/tmp/x.gguf",
    )
    flat = cfg.to_flat_dict()
    assert set(flat) == {f.name for _, f in engine_fields()}
    assert EngineConfig.from_kwargs(**flat) == cfg
    assert EngineConfig.from_kwargs(**EngineConfig().to_flat_dict()) == EngineConfig()


def test_engine_fields_are_unique_and_complete() -> None:
    names = [f.name for _, f in engine_fields()]
    assert len(names) == len(set(names)), "two groups share a field name"
    assert "attention_backend" in names and "page_size" in names
    for _, f in engine_fields():
        assert f.metadata.get("help"), f"{f.name} has no help text"


# --- CLI flags ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_engine_flags(parser)
    return parser


def test_every_engine_field_has_a_flag() -> None:
    parser = _parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for _, f in engine_fields():
        assert "--" + f.name.replace("_", "-") in flags
    parser.format_help()  # help texts must survive argparse's %-formatting


def test_flags_parse_to_typed_engine_kwargs() -> None:
    args = _parser().parse_args(["--page-size", "32", "--streaming-sparsity", "0.5", "--dtype", "float32"])
    kw = engine_kwargs(args)
    assert kw == {"page_size": 32, "streaming_sparsity": 0.5, "dtype": "float32"}
    assert type(kw["page_size"]) is int and type(kw["streaming_sparsity"]) is float
    assert "num_kv_pages" not in kw and "attention_backend" not in kw  # not supplied: absent
    cfg = EngineConfig.from_kwargs(**kw)
    assert cfg.cache.page_size == 32 and cfg.sparse.streaming_sparsity == 0.5 and cfg.model.dtype == "float32"


def test_optional_flags_and_skip() -> None:
    args = _parser().parse_args(["--num-kv-pages", "7", "--kv-cache-memory-fraction", "0.3", "--model", "m.gguf"])
    assert engine_kwargs(args) == {"num_kv_pages": 7, "kv_cache_memory_fraction": 0.3, "model": "m.gguf"}
    parser = argparse.ArgumentParser()
    add_engine_flags(parser, skip=("model",))
    assert "model" not in engine_kwargs(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x"])


def test_nothing_supplied_gives_no_kwargs() -> None:
    assert engine_kwargs(_parser().parse_args([])) == {}


@pytest.mark.parametrize(
    "argv",
    [["--dtype", "fp8"], ["--device", "tpu"], ["--attention-backend", "flash"], ["--page-size", "x"]],
)
def test_bad_flags_are_rejected_by_argparse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="t")
    add_engine_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "invalid" in capsys.readouterr().err


def test_kv_cache_size_on_the_cpu_is_fixed_by_default_and_settable() -> None:
    import torch

    from lserve.kv_cache import layout

    cpu = torch.device("cpu")
    assert layout.memory_budget_bytes(cpu, None) <= layout.DEFAULT_CPU_KV_BYTES
    assert layout.memory_budget_bytes(cpu, None, 12345) == 12345
    share = layout.memory_budget_bytes(cpu, 0.01)
    assert 0 < share < layout.available_memory_bytes(cpu)  # a fraction set by hand is a share, uncapped
    with pytest.raises(ValueError, match="not both"):
        EngineConfig.from_kwargs(kv_cache_memory_bytes=2**30, kv_cache_memory_fraction=0.5)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        EngineConfig.from_kwargs(kv_cache_memory_bytes=0)


def test_kv_cache_memory_bytes_sizes_the_pool() -> None:
    from lserve import LLM

    llm = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=2**28)
    per_page = 64 * 30 * 3 * 64 * 2 * 4  # tokens x layers x KV heads x head dim x (K, V) x float32
    assert llm.llm_engine.core.kv_manager.pool.num_pages == 2**28 // per_page
