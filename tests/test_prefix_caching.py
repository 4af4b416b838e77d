"""Automatic prefix caching (dense, page selection, streaming heads, sliding windows): a hit gives
the cold run's tokens, a changed token misses from its page on, cached pages are evicted least
recently freed first, and under a tiny pool with preemption and aborts the pages and counts stay
right; the server reports cached tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.kv_cache.page_pool import PagePool
from lserve.sparse.patterns import HeadPattern, save_pattern
from tests.helpers_models import hf_config, hf_model, random_ids, save_hf, save_word_tokenizer
from tests.passkey import FILLER

PAGE = 16
DOC = "Here is a story. " + FILLER * 6  # ~150 tokens: nine full pages
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def cold() -> LLM:
    """The dense engine without the cache."""
    return LLM(dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def pattern_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(2)
    path = tmp_path_factory.mktemp("pattern") / "random.json"
    return save_pattern(HeadPattern(torch.rand((30, 3), generator=gen), {"method": "random, for tests"}), path)


STREAMING = dict(streaming_sparsity=0.5, prefill_sink_tokens=16, prefill_local_tokens=48, decode_sink_tokens=16,
                 decode_local_tokens=48)
CONFIGS = {
    "dense": {},
    "rope_mass": {"token_budget": 64, "selector_interval": 1},
    "quest": {"token_budget": 64, "page_score": "quest", "logical_page_size": 16},
    "streaming": STREAMING,
    "both": {**STREAMING, "token_budget": 64, "selector_interval": 1},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_hit_gives_the_cold_tokens(name: str, pattern_path: Path) -> None:
    """The same engine settings, cold (a fresh engine) and hit (after a prompt that shares the
    document): the same greedy tokens. Streaming heads keep their history paged with the cache."""
    kw = dict(CONFIGS[name])
    if "streaming_sparsity" in kw:
        kw["attn_pattern"] = str(pattern_path)
    llm = LLM(dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=True, **kw)
    questions = [DOC + "\nWhat is the story about?", DOC + "\nWho is in the story?", DOC + "\nWhere does it happen?"]
    first = llm.generate(questions[0], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    hits = llm.generate(questions[1:], GREEDY, use_tqdm=False)
    n_doc = len(llm.get_tokenizer().encode(DOC))
    for out in hits:
        assert out.num_cached_tokens >= (n_doc // PAGE - 1) * PAGE > 0
    cold = [LLM(dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=True, **kw)
            .generate(q, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for q in questions[1:]]
    assert [o.outputs[0].token_ids for o in hits] == cold
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits == sum(o.num_cached_tokens for o in hits) and stats.prefix_cache_queries > 0
    assert llm.engine.core.kv_cache.ring is None  # the streaming heads' history is paged
    llm.engine.core.scheduler.check_invariants()


def test_a_hit_on_a_sliding_window_model(tmp_path: Path) -> None:
    ref = hf_model(hf_config("mistral", sliding_window=20), seed=3)
    folder = save_hf(ref, tmp_path / "model")
    save_word_tokenizer(folder)
    doc = random_ids(90, seed=4).tolist()
    prompts = [doc + random_ids(7, seed=s).tolist() for s in (5, 6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model=str(folder), dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=True)
    assert llm.engine.core.kv_cache.window is None  # windowed layers keep their history paged
    llm.generate(prompts[0], params, use_tqdm=False)
    hit = llm.generate(prompts[1], params, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 80
    cold = LLM(model=str(folder), dtype="float32", device="cpu", page_size=PAGE)  # the window pool, no cache
    assert hit.outputs[0].token_ids == cold.generate(prompts[1], params, use_tqdm=False)[0].outputs[0].token_ids


def test_the_cache_is_on_by_default_unless_it_would_give_up_a_ring(pattern_path: Path, tmp_path: Path) -> None:
    def core(**kw):  # noqa: ANN202
        return LLM(dtype="float32", device="cpu", page_size=PAGE, **kw).engine.core

    assert core().prefix_caching and core(token_budget=64).prefix_caching
    streaming = core(attn_pattern=str(pattern_path), **STREAMING)
    assert not streaming.prefix_caching and streaming.kv_cache.ring is not None
    forced = core(attn_pattern=str(pattern_path), enable_prefix_caching=True, **STREAMING)
    assert forced.prefix_caching and forced.kv_cache.ring is None
    assert not core(enable_prefix_caching=False).prefix_caching
    folder = save_hf(hf_model(hf_config("mistral", sliding_window=20), seed=3), tmp_path / "model")
    save_word_tokenizer(folder)
    windowed = LLM(model=str(folder), dtype="float32", device="cpu", page_size=PAGE).engine.core
    assert not windowed.prefix_caching and windowed.kv_cache.window is not None
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        core(enable_prefix_caching="yes")


def test_a_changed_token_misses_from_its_page_on() -> None:
    llm = LLM(dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=True)
    ids = llm.get_tokenizer().encode(DOC + "\nWhat is the story about?")
    llm.generate(ids, GREEDY, use_tqdm=False)
    for pos in (5, 40, 100):
        changed = list(ids)
        changed[pos] = (changed[pos] + 1) % 1000
        assert llm.generate(changed, GREEDY, use_tqdm=False)[0].num_cached_tokens == pos // PAGE * PAGE
    again = llm.generate(ids, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(ids) - 1) // PAGE * PAGE  # one token is always computed


def test_eviction_is_least_recently_freed_first() -> None:
    pool = PagePool(4)
    a, b, c, d = pool.allocate(4)
    for page, key in ((a, b"a"), (b, b"b"), (c, b"c")):
        assert pool.tag(page, key)
    pool.free([b])
    pool.free([a])
    pool.free([d])  # untagged: back to the free list
    pool.free([c])
    assert pool.num_free_pages == 4 and pool.num_cached_pages == 3
    assert pool.allocate(1) == [d]  # free pages before cached ones
    pool.share([pool.lookup(b"a")])  # a hit takes `a` out of the cache
    assert pool.allocate(1) == [b]  # then the least recently freed: b (freed before c)
    assert pool.lookup(b"b") is None and pool.lookup(b"c") == c
    pool.free([a])
    assert pool.allocate(2) == [c, a]
    pool.check_invariants()


def test_random_traffic_under_a_tiny_pool_keeps_pages_right(cold: LLM) -> None:
    """Requests sharing prefixes, a pool too small for them all (preemption, eviction), random
    aborts: invariants after every step, greedy tokens of the finished ones equal cold runs."""
    rng = random.Random(0)
    llm = LLM(dtype="float32", device="cpu", page_size=PAGE, enable_prefix_caching=True, num_kv_pages=40,
              max_num_seqs=6)
    engine, core = llm.engine, llm.engine.core
    stems = [DOC, "A different story starts here. " + FILLER * 3, DOC[:200]]
    prompts = [rng.choice(stems) + f"\nQuestion {i}: tell me more." for i in range(14)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    finished, aborted = {}, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        core.scheduler.check_invariants()
        if rng.random() < 0.08:
            victim = rng.choice([rid for rid in ids if rid not in finished and rid not in aborted] or [None])
            if victim is not None:
                engine.abort_request(victim)
                aborted.add(victim)
    assert core.scheduler.num_preemptions > 0 and core.scheduler.prefix_cache_hits > 0
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages  # cached pages count as free
    done = [(i, rid) for i, rid in enumerate(ids) if rid in finished and rid not in aborted]
    want = cold.generate([prompts[i] for i, _ in done], params, use_tqdm=False)
    assert [finished[rid].outputs[0].token_ids for _, rid in done] == [w.outputs[0].token_ids for w in want]


def test_server_reports_cached_tokens() -> None:
    import httpx

    from tests.server_helpers import API_KEY, DEFAULT_ARGS, RemoteServer

    server = RemoteServer(*DEFAULT_ARGS, "--enable-prefix-caching", "--page-size", str(PAGE))
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        usages = [httpx.post(server.url + "/v1/completions", headers=headers, timeout=120,
                             json={"prompt": DOC + f"\nQuestion {i}:", "max_tokens": 2}).json()["usage"]
                  for i in range(2)]
        assert usages[0]["prompt_tokens_details"] is None
        cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % PAGE == 0
        m = server.wait_idle()
        assert m["vllm:prefix_cache_hits_total"] == cached
        assert m["vllm:prefix_cache_queries_total"] == usages[0]["prompt_tokens"] + usages[1]["prompt_tokens"]
        # a stream's final usage chunk says it too
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, timeout=120, json={
                "messages": [{"role": "user", "content": DOC}], "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert json.loads(lines[-1][6:])["usage"]["prompt_tokens_details"] is None  # nothing cached yet
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, timeout=120, json={
                "messages": [{"role": "user", "content": DOC}], "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert json.loads(lines[-1][6:])["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        server.stop()
