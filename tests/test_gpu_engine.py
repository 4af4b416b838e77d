"""The engine on a CUDA GPU with the Triton backend (the default there): a smoke run on dummy weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "eos_token_id": 2,
}


def test_triton_backend_runs_the_engine(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", num_kv_pages=200, max_num_batched_tokens=512)
    core = llm.engine.core
    assert core.backend_name == "triton"
    prompts = [[(7 * i + j) % 900 + 10 for j in range(n)] for i, n in enumerate((5, 700, 129, 1500))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [20] * 4
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages


@pytest.mark.parametrize("sparse", ["dense", "static+dynamic"])
def test_cuda_graph_decode_gives_the_eager_tokens(tmp_path: Path, sparse: str) -> None:
    """Captured decode graphs (buckets with padded rows, every selector mode) change no token."""
    import torch

    from lserve.sparse.patterns import HeadPattern, save_pattern

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    kw: dict = {}
    if sparse != "dense":
        pattern = save_pattern(HeadPattern(torch.rand((4, 2), generator=torch.Generator().manual_seed(0)), {}),
                               tmp_path / "p.json")
        kw = dict(streaming_sparsity=0.5, attn_pattern=str(pattern), decode_sink_tokens=16, decode_local_tokens=64,
                  prefill_sink_tokens=16, prefill_local_tokens=128, token_budget=256, page_size=32,
                  selector_interval=3)
    prompts = [[(7 * i + j) % 900 + 10 for j in range(n)] for i, n in enumerate((5, 700, 129, 1500, 300))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = {}
    # eager with the ring and paged pools one after the other on one stream, eager with the ring
    # on a side stream (the default), and captured graphs (the side stream as a parallel branch)
    for eager, pool_streams in ((True, False), (True, True), (False, True)):
        llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", num_kv_pages=300,
                  max_num_batched_tokens=512, max_num_seqs=8, enforce_eager=eager, **kw)
        llm.engine.core.runner.backend.pool_streams = pool_streams
        graphs = llm.engine.core.runner.graphs
        assert (graphs is None) == eager
        captured = set(graphs._graphs) if graphs is not None else set()
        outs[eager, pool_streams] = [o.outputs[0].token_ids
                                     for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:  # every bucket and selector mode captured at start-up; serving captured none
            modes = {"none"} if sparse == "dense" else {"none", "reuse", "select"}
            assert captured == {(b, m) for b in graphs.buckets for m in modes} == set(graphs._graphs)
            assert len(graphs.buckets) > 1  # several buckets, padded rows included
    assert outs[False, True] == outs[True, True] == outs[True, False]


def test_async_scheduling_with_cuda_graphs_gives_the_synchronous_tokens(tmp_path: Path) -> None:
    """Steps launched before the previous tokens are read (in-flight input ids filled on the GPU,
    pinned non-blocking copies, replayed graphs) give the tokens of the synchronous engine."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    prompts = [[(7 * i + j) % 900 + 10 for j in range(n)] for i, n in enumerate((5, 700, 129, 1500, 300))]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=33, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, stop_token_ids=[11]),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=50, seed=1, max_tokens=40, ignore_eos=True)]
    outs = {}
    for overlap in (False, True):
        llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", num_kv_pages=300,
                  max_num_batched_tokens=512, max_num_seqs=8, async_scheduling=overlap)
        outs[overlap] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        core = llm.engine.core
        assert core.runner.graphs is not None and core.kv_manager.num_free_pages == core.kv_manager.num_pages
    assert outs[True] == outs[False]


def test_decode_gemv_gives_the_same_tokens_eager_and_in_graphs(tmp_path: Path) -> None:
    """bf16 (the GEMV's dtype): one request decodes one row per step, so its projections with
    K >= N/2 go through `ops.gemv` (called eagerly, or while a graph is captured); captured
    graphs give the eager tokens."""
    from unittest import mock

    from lserve.model.layers import Linear
    from lserve.ops import gemv as gemv_module

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    prompt = [[(7 * j) % 900 + 10 for j in range(300)]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        # (the spy covers start-up too: that is where the decode graphs are captured)
        with mock.patch.object(gemv_module, "gemv", wraps=gemv_module.gemv) as spy:
            llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", num_kv_pages=100,
                      max_num_batched_tokens=512, max_num_seqs=4, enforce_eager=eager)
            outs[eager] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert Linear.use_gemv and spy.call_count > 0
    assert outs[True] == outs[False]


def test_gemma3_window_pool_forks_and_prefix_hits_on_the_gpu(tmp_path: Path) -> None:
    """A tiny Gemma 3 (sliding and global layers, the window pool) through compiled Triton kernels
    and captured decode graphs: the eager tokens; n = 3 sequences forked from one prompt (pages
    shared, the window blocks copied on the device) equal three single runs; a prefix-cache hit
    gives the cold tokens."""
    from tests.helpers_models import hf_config, hf_model, random_ids, save_hf, save_word_tokenizer

    folder = save_hf(hf_model(hf_config("gemma3", sliding_window=24, head_dim=32), seed=5), tmp_path / "gemma")
    save_word_tokenizer(folder)
    prompts = [random_ids(n, seed=n).tolist() for n in (150, 9, 77)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kw = dict(dtype="float32", page_size=16, max_num_batched_tokens=64, num_kv_pages=200)
    outs = {}
    for eager in (True, False):
        llm = LLM(model=str(folder), enforce_eager=eager, **kw)
        assert llm.engine.core.kv_cache.window is not None and llm.engine.core.backend_name == "triton"
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert outs[True] == outs[False]

    sampled = [SamplingParams(temperature=0.8, seed=3 + i, max_tokens=10, ignore_eos=True) for i in range(3)]
    singles = [llm.generate(prompts[:1], p, use_tqdm=False)[0].outputs[0].token_ids for p in sampled]
    forked = llm.generate(prompts[:1], SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [c.token_ids for c in forked.outputs] == singles

    cached = LLM(model=str(folder), enable_prefix_caching=True, **kw)
    first, again = (cached.generate(prompts[:1], greedy, use_tqdm=False)[0] for _ in range(2))
    assert again.num_cached_tokens == 144 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert first.outputs[0].token_ids == outs[True][0]
