"""The engine with an FP8 KV cache (`kv_cache_dtype="fp8"`): memory, tokens, both backends.

On the CPU: the default model's KV bytes per sequence and greedy text against the model-dtype
cache; a tiny random model with streaming heads and page selection gives the same tokens with
the torch backend and the Triton kernels (interpreter); forks and prefix-cache hits copy and
share FP8 pages with their scales. On a GPU: Triton against the torch backend in bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.kv_cache.fp8 import FP8_DTYPE
from lserve.kv_cache.layout import KVCacheTensors, KVShape
from tests.helpers_models import hf_config, hf_model, random_ids, save_hf, save_word_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (8 query heads, 4 KV heads) with a word tokenizer and a head pattern."""
    from lserve.sparse.patterns import HeadPattern, save_pattern

    folder = save_hf(hf_model(hf_config("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=16),
                              seed=5), tmp_path_factory.mktemp("fp8") / "model")
    save_word_tokenizer(folder)
    scores = torch.rand((2, 4), generator=torch.Generator().manual_seed(5))
    save_pattern(HeadPattern(scores, {"method": "random, for tests"}), folder / "pattern.json")
    return folder


SPARSE = dict(streaming_sparsity=0.5, prefill_sink_tokens=5, prefill_local_tokens=21, decode_sink_tokens=5,
              decode_local_tokens=19, token_budget=48, selector_interval=2)
"""Windows that cross 16-token pages; a budget of three pages."""


def _sparse_settings(tiny: Path, sparse: str) -> dict:
    """dense; streaming heads and page selection (rope_channels on labels in the model's dtype);
    the same with rope_mass on FP8 labels."""
    if sparse == "dense":
        return {}
    extra = dict(SPARSE, attn_pattern=str(tiny / "pattern.json"))
    return extra if sparse == "static+dynamic" else dict(extra, page_score="rope_mass", label_dtype="fp8")


def _tokens(llm: LLM, prompts: list, params: list[SamplingParams]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_fp8_cache_needs_about_a_quarter_of_float32_and_keeps_the_greedy_text(default_llm: LLM) -> None:
    fp8 = LLM(dtype="float32", device="cpu", kv_cache_dtype="fp8", num_kv_pages=64)
    core, base = fp8.engine.core, default_llm.engine.core
    arch = core.arch
    assert core.kv_cache.paged.k[0].dtype == FP8_DTYPE and core.kv_cache.paged.k_scale is not None
    per_token = 2 * arch.num_layers * arch.num_kv_heads * (arch.head_dim + 4)  # 1-byte values + a float32 scale
    n = 4096
    assert core.kv_bytes_per_sequence(n) == -(-n // core.kv_cache.shape.page_size) * core.kv_cache.shape.page_size \
        * per_token
    assert base.kv_bytes_per_sequence(n) / core.kv_bytes_per_sequence(n) == pytest.approx(4 * 64 / 68)
    prompts = ["The capital of France is", "List three colours:", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=10)
    want = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params, use_tqdm=False)]
    assert [g[:6] for g in got] == [w[:6] for w in want]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels on the CPU run in the interpreter only "
                    "without a GPU; the GPU test below compares them with the CPU")
@pytest.mark.parametrize("sparse", ["dense", "static+dynamic", "fp8 labels"])
def test_torch_backend_and_triton_kernels_give_the_same_tokens(tiny: Path, sparse: str) -> None:
    extra = _sparse_settings(tiny, sparse)
    prompts = [{"prompt_token_ids": random_ids(n, seed=n).tolist()} for n in (90, 7, 61)]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    kw = dict(model=str(tiny), dtype="float32", device="cpu", page_size=16, max_num_batched_tokens=40,
              kv_cache_dtype="fp8", **extra)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(attention_backend=backend, **kw)
        outs[backend] = _tokens(llm, prompts, params)
        core = llm.engine.core
        assert core.kv_cache.paged.k[0].dtype == FP8_DTYPE
        if sparse != "dense":
            assert core.kv_cache.ring is not None and core.kv_cache.ring.k_scale is not None
            stats = llm.engine.get_stats()
            assert stats.decode_pages_read < stats.decode_pages_dense
        labels = core.kv_cache.paged.k_label
        assert (labels is not None and labels[0].dtype == FP8_DTYPE) == (sparse == "fp8 labels")
        assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
    assert outs["triton"] == outs["torch"]


def test_forks_and_prefix_hits_share_fp8_pages_with_their_scales(tiny: Path) -> None:
    kw = dict(model=str(tiny), dtype="float32", device="cpu", page_size=16, kv_cache_dtype="fp8")
    prompt = {"prompt_token_ids": random_ids(75, seed=2).tolist()}
    llm = LLM(enable_prefix_caching=True, **kw)
    cold = _tokens(llm, [prompt], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])
    hit = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert hit.num_cached_tokens >= 64 and list(hit.outputs[0].token_ids) == cold[0]
    # n = 3 forks of one prompt (its last partial page copied with its scales) equal single seeded runs
    forked = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    single = LLM(enable_prefix_caching=False, **kw)
    for i, choice in enumerate(forked.outputs):
        alone = _tokens(single, [prompt], [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8, ignore_eos=True)])
        assert list(choice.token_ids) == alone[0]


def test_page_copies_carry_the_scales() -> None:
    pool = KVCacheTensors(KVShape(2, 2, 16, 16, torch.float32, cache_dtype=FP8_DTYPE), 5, torch.device("cpu"))
    for t in (*pool.k, *pool.v):
        t.view(torch.uint8).copy_(torch.randint(0, 120, t.shape, dtype=torch.uint8))
    for t in (*pool.k_scale, *pool.v_scale):
        t.copy_(torch.rand(t.shape))
    pool.copy_pages([1, 3], [4, 0])
    for t in (*pool.k, *pool.v, *pool.k_scale, *pool.v_scale):
        raw = t.view(torch.uint8) if t.dtype == FP8_DTYPE else t
        assert torch.equal(raw[4], raw[1]) and torch.equal(raw[0], raw[3])


def test_page_copies_carry_the_fp8_labels_and_their_scales() -> None:
    channels = [torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)] * 2
    pool = KVCacheTensors(KVShape(2, 2, 16, 16, torch.float32), 5, torch.device("cpu"), label_channels=channels,
                          label_fp8=True)
    assert pool.k_label is not None and pool.label_scale is not None and pool.k_label[0].dtype == FP8_DTYPE
    for t in pool.k_label:
        t.view(torch.uint8).copy_(torch.randint(0, 120, t.shape, dtype=torch.uint8))
    for t in pool.label_scale:
        t.copy_(torch.rand(t.shape))
    pool.copy_pages([1], [4])
    for t in (*pool.k_label, *pool.label_scale):
        raw = t.view(torch.uint8) if t.dtype == FP8_DTYPE else t
        assert torch.equal(raw[:, 64:80], raw[:, 16:32]) and not torch.equal(raw[:, 0:16], raw[:, 16:32])


def test_bad_kv_cache_dtype_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype='fp16' is not one of 'auto', 'fp8', 'fp8_e4m3'"):
        LLM(dtype="float32", device="cpu", kv_cache_dtype="fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", ["dense", "static+dynamic", "fp8 labels"])
def test_the_gpu_kernels_give_the_cpu_tokens(tiny: Path, sparse: str) -> None:
    """Triton on the GPU (decode graphs included) and the torch backend on the CPU, both float32."""
    extra = _sparse_settings(tiny, sparse)
    prompts = [{"prompt_token_ids": random_ids(n, seed=n).tolist()} for n in (90, 7, 61)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(model=str(tiny), dtype="float32", page_size=16, max_num_batched_tokens=40, kv_cache_dtype="fp8",
              **extra)
    cpu = _tokens(LLM(device="cpu", **kw), prompts, [params] * 3)
    gpu = LLM(device="cuda", **kw)
    assert gpu.engine.core.backend_name == "triton"
    assert _tokens(gpu, prompts, [params] * 3) == cpu
