"""Tensor-parallel model shards (`model/parallel.py`) over gloo: two spawned ranks, each holding
half the heads, half the MLP and half the vocabulary (a vocabulary that does not split evenly is
padded), give the single-process model's logits. Tiny random models of every family, from HF
folders and from a GGUF file; plus the clear errors for models that do not split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lserve.errors import LServeError
from lserve.model.config import ArchConfig
from lserve.model.parallel import TensorParallel, shard_config
from tests.helpers_models import (
    has_fp8_matmul,
    hf_config,
    hf_model,
    load_lserve,
    lserve_logits,
    random_ids,
    save_hf,
    write_llama_gguf,
)

WORLD = 2
MODELS = {
    "llama": ("llama", {"vocab_size": 301}),  # 301 = 2 x 150 + 1: the last slice is padded
    "qwen2-bias": ("qwen2", {}),  # q/k/v biases (column-parallel: sliced with their rows)
    "qwen3": ("qwen3", {}),  # per-head q/k norms
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "gemma3": ("gemma3", {}),  # sandwich norms, GELU MLP, tied and scaled embeddings, soft-capping off
}


def _rank(rank: int, init: str, paths: list[str], ids: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        tp = TensorParallel(rank, WORLD)
        logits = []
        for path in paths:
            model = load_lserve(path, tp=tp)
            attn = model.layers[0].self_attn
            # a real shard: half of the 4 query and 2 KV heads, of the MLP and of the vocabulary
            assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
            assert model.layers[0].mlp.down_proj.in_features == 48 and model.embed_tokens.num_embeddings < 301
            logits.append(lserve_logits(model, ids))
        torch.save(logits, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_logits(tmp_path: Path) -> None:
    paths = []
    for name, (family, overrides) in MODELS.items():
        paths.append(str(save_hf(hf_model(hf_config(family, **overrides), seed=3), tmp_path / name)))
    gguf = write_llama_gguf(hf_model(hf_config("llama"), seed=4), tmp_path / "llama.gguf")
    paths.append(str(gguf))
    ids = random_ids(23, seed=5)
    want = [lserve_logits(load_lserve(p), ids) for p in paths]
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", paths, ids, str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for path, g, w in zip(paths, got, want):
            assert g.shape == w.shape, path
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


def test_shards_of_the_config_and_models_that_do_not_split() -> None:
    arch = ArchConfig.from_hf_dict({**hf_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]})
    half = shard_config(arch, TensorParallel(1, 2))
    assert (half.num_heads, half.num_kv_heads, half.intermediate_size) == (2, 1, 48)
    assert half.vocab_size == 150 and half.head_dim == arch.head_dim and half.hidden_size == arch.hidden_size
    with pytest.raises(LServeError, match="tensor_parallel_size=4 does not divide the model's 2 KV heads"):
        shard_config(arch, TensorParallel(0, 4))


# --- the engine with two ranks ------------------------------------------------------------------


STREAMING = dict(streaming_sparsity=0.5, prefill_sink_tokens=16, prefill_local_tokens=32, decode_sink_tokens=16,
                 decode_local_tokens=32)
ENGINES = {
    "dense, 8 KV heads": (8, {}),
    "streaming, 4 KV heads": (4, STREAMING),
    "selection, 4 KV heads": (4, {"token_budget": 32, "selector_interval": 1}),
    "both, 8 KV heads": (8, {**STREAMING, "token_budget": 32, "selector_interval": 2}),
    # the streaming heads all in the first half of each layer: the ranks get one each after the permutation
    "streaming, skewed pattern": (4, {**STREAMING, "pattern": "skewed.json"}),
    # each rank quantizes its own shard (a row-parallel layer's channel scales cover its slice of K)
    "FP8 weights and KV, 8 KV heads": (8, {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
}


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Tiny random Llama folders with 8 query heads and 4 or 8 KV heads, and a random head pattern each."""
    from lserve.sparse.patterns import HeadPattern, save_pattern
    from tests.helpers_models import save_word_tokenizer

    out = {}
    for kv in (4, 8):
        folder = save_hf(hf_model(hf_config("llama", num_attention_heads=8, num_key_value_heads=kv, head_dim=8),
                                  seed=kv), tmp_path_factory.mktemp(f"kv{kv}") / "model")
        save_word_tokenizer(folder)
        scores = torch.rand((2, kv), generator=torch.Generator().manual_seed(kv))
        save_pattern(HeadPattern(scores, {"method": "random, for tests"}), folder / "pattern.json")
        skewed = torch.arange(kv, dtype=torch.float32).repeat(2, 1) / kv  # low scores stream: the first half
        save_pattern(HeadPattern(skewed, {"method": "skewed, for tests"}), folder / "skewed.json")
        out[kv] = folder
    return out


@pytest.mark.parametrize("name", list(ENGINES))
def test_an_engine_with_two_ranks_gives_the_single_process_tokens(kv_models: dict[int, Path], name: str) -> None:
    import gc
    import multiprocessing

    from lserve import LLM, SamplingParams

    kv, extra = ENGINES[name]
    if "quantization" in extra and not has_fp8_matmul(torch.device("cpu")):
        pytest.skip("this CPU build of torch has no FP8 products with per-row scales")
    folder = kv_models[kv]
    if "streaming_sparsity" in extra:
        extra = {k: v for k, v in extra.items() if k != "pattern"}
        extra["attn_pattern"] = str(folder / ENGINES[name][1].get("pattern", "pattern.json"))
    prompts = [{"prompt_token_ids": random_ids(n, seed=n).tolist()} for n in (120, 9, 70)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)]
    kw = dict(model=str(folder), dtype="float32", device="cpu", page_size=16, max_num_batched_tokens=48, **extra)
    outs = {}
    for tp in (1, 2):
        llm = LLM(tensor_parallel_size=tp, **kw)
        outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        core = llm.engine.core
        assert core.local_arch.num_kv_heads == kv // tp and core.kv_manager.num_free_pages == core.kv_manager.num_pages
        if "token_budget" in extra:
            assert llm.engine.get_stats().decode_pages_read < llm.engine.get_stats().decode_pages_dense
        if "skewed" in name:
            streaming = [len(h) for h in core.kv_cache.streaming_heads]
            assert streaming == ([2, 2] if tp == 1 else [1, 1])  # rank 0 holds one of the two per layer
        del llm, core
        gc.collect()
    assert outs[2] == outs[1]
    assert not multiprocessing.active_children(), "a rank outlived its engine"


def test_a_model_that_does_not_split_is_refused_before_any_process_starts() -> None:
    import multiprocessing

    from lserve import LLM

    with pytest.raises(LServeError, match="tensor_parallel_size=2 does not divide the model's 9 attention heads"):
        LLM(dtype="float32", device="cpu", tensor_parallel_size=2)  # SmolLM2: 9 query and 3 KV heads
    assert not multiprocessing.active_children()


def test_balanced_kv_order_and_the_permuted_heads() -> None:
    from lserve.model.parallel import balanced_kv_order, permute_kv_heads

    assert balanced_kv_order([True, True, False, False], 2) == [0, 2, 1, 3]
    assert balanced_kv_order([False, True, True, True, False, False], 3) == [1, 0, 2, 4, 3, 5]
    assert balanced_kv_order([True, False], 1) == [0, 1]
    d, order = 2, [1, 0]  # 2 KV heads, 2 query heads each
    q = torch.arange(4 * d, dtype=torch.float32)[:, None].expand(-1, 3)  # row i holds i
    assert permute_kv_heads("q_proj.weight", q, order, 4, 2, d)[:, 0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert permute_kv_heads("k_proj.bias", torch.arange(2 * d), order, 4, 2, d).tolist() == [2, 3, 0, 1]
    o = torch.arange(4 * d)[None, :].expand(3, -1)
    assert permute_kv_heads("o_proj.weight", o, order, 4, 2, d)[0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert permute_kv_heads("mlp.down_proj.weight", o, order, 4, 2, d) is o


def test_one_engine_per_process_and_a_lost_rank_stops_the_engine(kv_models: dict[int, Path]) -> None:
    import gc
    import multiprocessing

    from lserve import LLM, SamplingParams

    kw = dict(model=str(kv_models[4]), dtype="float32", device="cpu", page_size=16, tensor_parallel_size=2)
    prompts = [{"prompt_token_ids": random_ids(30, seed=1).tolist()}]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = LLM(**kw)
    want = first.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(LServeError, match="already running in this process"):
        LLM(**kw)
    assert first.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids == want  # untouched
    for proc in multiprocessing.active_children():  # rank 1 dies
        proc.kill()
        proc.join()
    with pytest.raises(LServeError, match="tensor-parallel"):
        first.generate(prompts, params, use_tqdm=False)
    with pytest.raises(LServeError, match="stopped"):
        first.generate(prompts, params, use_tqdm=False)
    del first
    gc.collect()
    again = LLM(**kw)  # the group was left: a new engine forms its own
    assert again.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids == want
