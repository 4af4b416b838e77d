"""n > 1: the sequences of one prompt share its KV pages (computed once by a prefill-only prefix,
forked with the partly filled last page and the ring blocks copied) and each equals a single
run with its own seed, dense, with streaming heads and with page selection, under preemption
and aborts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lserve import LLM, SamplingParams
from lserve.engine.llm import parallel_params
from lserve.sparse.patterns import HeadPattern, save_pattern
from tests.passkey import FILLER

PROMPT = "Here is a story. " + FILLER * 3 + "\nThe story is about"  # ~160 tokens: 10 pages of 16 and a part


def _singles(llm: LLM, params: SamplingParams) -> list[list[int]]:
    """Each sequence run alone, with its own seed (seed + i)."""
    return [o.outputs[0].token_ids for o in llm.generate([PROMPT] * params.n, parallel_params(params), use_tqdm=False)]


def _assert_clean(llm: LLM) -> None:
    core = llm.engine.core
    core.scheduler.check_invariants()
    assert core.kv_manager.num_free_pages == core.kv_manager.num_pages
    assert not core.scheduler.prefixes and not core.scheduler.waiting and not core.scheduler.running


@pytest.fixture(scope="module")
def paged_llm() -> LLM:
    # (without the prefix cache: the tests count what a fork shares, and repeat one prompt)
    return LLM(dtype="float32", device="cpu", page_size=16, enable_prefix_caching=False)


def test_n_sequences_equal_single_runs_with_their_seeds(paged_llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=10, n=4)
    out = paged_llm.generate(PROMPT, params, use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2, 3]
    assert "-" not in out[0].request_id  # the prompt's id, not its first sequence's
    got = [c.token_ids for c in out[0].outputs]
    assert got == _singles(paged_llm, params)
    assert len({tuple(t) for t in got}) == 4, "four seeds gave the same sequence"
    _assert_clean(paged_llm)


def test_the_prompt_is_computed_once_and_its_pages_shared(paged_llm: LLM) -> None:
    engine = paged_llm.engine
    core = engine.core
    prompt_ids = engine.encode(PROMPT)
    n, page = 4, core.kv_manager.page_size
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * n
    engine.add_parallel_requests(PROMPT, params, [f"share-{i}" for i in range(n)])
    computed = 0
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        computed += engine.last_step_num_tokens
        peak = max(peak, core.kv_manager.num_pages - core.kv_manager.num_free_pages)
        core.scheduler.check_invariants()
    # the prompt but its last token once, then per sequence its last prompt token and its decodes
    assert computed == len(prompt_ids) - 1 + n * 6
    full_pages = (len(prompt_ids) - 1) // page
    assert peak <= full_pages + 1 + n * 2 < n * -(-len(prompt_ids) // page)
    _assert_clean(paged_llm)


def test_greedy_sequences_equal_one_greedy_run(paged_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=12, n=3)
    out = paged_llm.generate([PROMPT, "Hi"], greedy, use_tqdm=False)  # "Hi": too short to share
    single = paged_llm.generate([PROMPT, "Hi"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for many, one in zip(out, single):
        assert [c.token_ids for c in many.outputs] == [one.outputs[0].token_ids] * 3
    _assert_clean(paged_llm)


@pytest.fixture(scope="module")
def pattern_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("pattern") / "random.json"
    return save_pattern(HeadPattern(torch.rand((30, 3), generator=gen), {"method": "random, for tests"}), path)


@pytest.mark.parametrize("sparse", ["streaming", "streaming-wide-prefill", "selection", "both"])
def test_forks_copy_ring_blocks_and_page_statistics(pattern_path: Path, sparse: str) -> None:
    """Streaming heads' ring pages (the full ones shared on fork, the partly filled one copied)
    and page selection statistics per page (the partly filled page's copied): each sequence
    equals its single run. With a prefill window wider than the decode window, each sequence's
    first row (its last prompt token, a prefill row) reads the prefix's prefill window."""
    kw: dict = dict(dtype="float32", device="cpu", page_size=16)
    if sparse in ("streaming", "both"):
        kw.update(streaming_sparsity=0.5, attn_pattern=str(pattern_path), prefill_sink_tokens=16,
                  prefill_local_tokens=48, decode_sink_tokens=16, decode_local_tokens=48)
    if sparse == "streaming-wide-prefill":
        kw.update(streaming_sparsity=0.5, attn_pattern=str(pattern_path), prefill_sink_tokens=16,
                  prefill_local_tokens=128, decode_sink_tokens=16, decode_local_tokens=32)
    if sparse in ("selection", "both"):
        kw.update(token_budget=64, page_score="quest", logical_page_size=16, selector_interval=1)
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=16, n=3)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == _singles(llm, params)
    _assert_clean(llm)


def test_preemption_and_aborts_keep_pages_right() -> None:
    llm = LLM(dtype="float32", device="cpu", page_size=16, num_kv_pages=24)
    engine, core = llm.engine, llm.engine.core
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, n=4)
    want = _singles(llm, params)
    got = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == want
    assert core.scheduler.num_preemptions > 0, "the pool was meant to be too small for four sequences"
    _assert_clean(llm)
    # aborted before the prefix ran: the prefix goes too
    ids = engine.add_parallel_requests(PROMPT, [SamplingParams(max_tokens=4)] * 3, ["a-0", "a-1", "a-2"])
    engine.step()
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests() or core.has_unfinished_requests():
        engine.step()
    _assert_clean(llm)


def test_bad_n_is_rejected() -> None:
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        SamplingParams(n=0)
