"""Triton kernels against their references in `lserve.ops.reference`.

On a CPU they run under TRITON_INTERPRET=1 (set in conftest.py) with small shapes; on a GPU the
same tests run compiled, plus a bfloat16 pass. Inputs are fresh random values with odd lengths;
outputs are poisoned with NaN before each run so that unwritten elements fail.
"""

from __future__ import annotations

import random

import pytest
import torch

from lserve.ops import reference as ref
from lserve.ops.kv_append import kv_append, plan_segments
from lserve.ops.merge_states import merge_states
from lserve.ops.sparse_decode import sparse_decode
from lserve.ops.sparse_prefill import plan_tiles, sparse_prefill

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # relative to the output's norm


def _rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    return float((out.double() - expected).norm() / expected.norm().clamp_min(1e-12))


class PagedSeqs:
    """Random sequences in a shuffled page pool (page tables with gaps, out of order)."""

    def __init__(self, seq_lens: list[int], page_size: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.seq_lens, self.page_size = seq_lens, page_size
        need = sum(-(-n // page_size) for n in seq_lens)
        num_pages = need + 5
        ids = list(range(num_pages))
        rng.shuffle(ids)
        self.page_tables = []
        for n in seq_lens:
            k = -(-n // page_size)
            self.page_tables.append(ids[:k])
            ids = ids[k:]
        shape = (num_pages, page_size, hkv, d)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        # poison what no sequence wrote: unused pages and the tail of each last page
        for cache in (self.k_cache, self.v_cache):
            cache[ids] = float("nan")
            for n, table in zip(seq_lens, self.page_tables):
                cache[table[-1], (n - 1) % page_size + 1 :] = float("nan")
        width = max(len(t) for t in self.page_tables)
        table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
        for i, t in enumerate(self.page_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        self.table = table.to(DEVICE)
        self.lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


# ---- KV append -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size,logical", [(16, 16), (32, 16), (64, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_append_with_statistics(page_size: int, logical: int, dtype: torch.dtype) -> None:
    hkv, d = 2, 32
    gen = torch.Generator().manual_seed(page_size)
    num_pages = 6
    k_cache = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    n_logical = num_pages * page_size // logical
    # stale statistics from an "earlier owner": a fresh logical page must not merge with them
    k_min = (torch.randn((n_logical, hkv, d), generator=gen) - 5).to(dtype).to(DEVICE)
    k_max = (torch.randn((n_logical, hkv, d), generator=gen) + 5).to(dtype).to(DEVICE)
    ref_kc, ref_vc, ref_min, ref_max = k_cache.clone(), v_cache.clone(), k_min.clone(), k_max.clone()
    pages = [4, 1, 3, 0, 5]  # one sequence, pages out of order
    written = 0
    for step_tokens in (19, 1, 1, 2 * page_size - 1, 5):  # a chunk, two decodes, a long chunk, a chunk
        pos = torch.arange(written, written + step_tokens)
        slots = (torch.tensor(pages)[pos // page_size] * page_size + pos % page_size).to(DEVICE)
        k = torch.randn((step_tokens, hkv, d), generator=gen).to(dtype).to(DEVICE)
        v = torch.randn((step_tokens, hkv, d), generator=gen).to(dtype).to(DEVICE)
        segs = plan_segments(slots, logical, all_single=step_tokens == 1)
        kv_append(k, v, slots, k_cache, v_cache, k_min, k_max, segs, logical_page_size=logical)
        ref.kv_append_ref(k, v, slots, ref_kc, ref_vc, ref_min, ref_max, logical)
        written += step_tokens
    assert torch.equal(k_cache.isnan(), ref_kc.isnan())
    assert torch.equal(k_cache.nan_to_num(), ref_kc.nan_to_num()) and torch.equal(v_cache.nan_to_num(), ref_vc.nan_to_num())
    assert torch.equal(k_min, ref_min) and torch.equal(k_max, ref_max)
    # and the statistics equal a from-scratch min/max over the sequence's keys
    keys = ref.gather_sequence(k_cache, pages, written).float()
    for lp in range(-(-written // logical)):
        chunk = keys[lp * logical : (lp + 1) * logical]
        g = pages[lp * logical // page_size] * (page_size // logical) + (lp * logical % page_size) // logical
        assert torch.equal(k_min[g].float(), chunk.amin(0)) and torch.equal(k_max[g].float(), chunk.amax(0))


@pytest.mark.parametrize("mapped,filtered", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_append_decode_rows(mapped: bool, filtered: bool, dtype: torch.dtype) -> None:
    """A pure decode step (one token per row: the kernel's single-token path) equals the
    reference and the general segment path: rows at a logical page's first slot start afresh
    over stale statistics, the others merge, with and without a head map (one pool of several)
    and a filter of the heads that keep statistics."""
    page_size, logical, d = 32, 16, 32
    hkv = 2
    gen = torch.Generator().manual_seed(11)
    heads = torch.tensor([2, 0], device=DEVICE) if mapped else None  # cache head -> model KV head
    model_heads = 3 if mapped else hkv
    k_cache = torch.full((7, page_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_min = (torch.randn((7 * page_size // logical, hkv, d), generator=gen) - 5).to(dtype).to(DEVICE)
    k_max = (torch.randn((7 * page_size // logical, hkv, d), generator=gen) + 5).to(dtype).to(DEVICE)
    # slots: page 3 offset 0 (fresh); page 1 offsets 16 (fresh), 17, 31 (one logical page: they merge);
    # page 6 offset 5 (merges with what its page holds)
    slots = torch.tensor([96, 48, 49, 197, 63], device=DEVICE)
    k = torch.randn((5, model_heads, d), generator=gen).to(dtype).to(DEVICE)
    v = torch.randn((5, model_heads, d), generator=gen).to(dtype).to(DEVICE)
    ref_kc, ref_vc, ref_min, ref_max = k_cache.clone(), v_cache.clone(), k_min.clone(), k_max.clone()
    gen_kc, gen_vc, gen_min, gen_max = k_cache.clone(), v_cache.clone(), k_min.clone(), k_max.clone()
    stale_min, stale_max = k_min.clone(), k_max.clone()
    src_k, src_v = (k[:, heads], v[:, heads]) if mapped else (k, v)
    flags = torch.tensor([False, True], device=DEVICE) if filtered else None  # cache head 0: no statistics
    # rows 48 and 49 share a logical page: the reference takes them one step at a time
    for t in range(5):
        ref.kv_append_ref(src_k[t : t + 1], src_v[t : t + 1], slots[t : t + 1], ref_kc, ref_vc, ref_min, ref_max,
                          logical, stats_heads=flags)
    # three decode steps (rows of one step are different sequences: never one logical page):
    # 48 starts its page, 49 and then 63 merge into it
    for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
        segs = plan_segments(slots[rows], logical, all_single=True)
        assert segs.single
        kv_append(k[rows], v[rows], slots[rows], k_cache, v_cache, k_min, k_max, segs, logical_page_size=logical,
                  head_map=heads, stats_heads=flags)
        kv_append(k[rows], v[rows], slots[rows], gen_kc, gen_vc, gen_min, gen_max,
                  plan_segments(slots[rows], logical), logical_page_size=logical, head_map=heads, stats_heads=flags)
    for got in ((k_cache, v_cache, k_min, k_max), (gen_kc, gen_vc, gen_min, gen_max)):
        assert torch.equal(got[0].isnan(), ref_kc.isnan())
        assert torch.equal(got[0].nan_to_num(), ref_kc.nan_to_num()) and torch.equal(got[1].nan_to_num(),
                                                                                   ref_vc.nan_to_num())
        assert torch.equal(got[2], ref_min) and torch.equal(got[3], ref_max)
    # the fresh pages hold exactly their one key: the stale statistics are gone (in the heads
    # that keep statistics; a filtered head's statistics are left as they were)
    kept = [1] if filtered else [0, 1]
    assert torch.equal(k_min[96 // logical, kept].float(), src_k[0, kept].float())
    assert torch.equal(k_max[48 // logical, kept].float(), src_k[[1, 2, 4]][:, kept].amax(0).float())
    if filtered:
        assert torch.equal(k_min[:, 0], stale_min[:, 0]) and torch.equal(k_max[:, 0], stale_max[:, 0])


def test_kv_append_without_statistics_and_head_filter() -> None:
    hkv, d, page_size = 3, 64, 16
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.full((5, page_size, hkv, d), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.tensor([17, 18, 19, 70, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], device=DEVICE)
    k = torch.randn((17, hkv, d), generator=gen).to(DEVICE)
    v = torch.randn((17, hkv, d), generator=gen).to(DEVICE)
    kv_append(k, v, slots, k_cache, v_cache)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert flat_k[untouched.to(DEVICE)].isnan().all()
    k_min = torch.zeros((5 * page_size // 16, hkv, d), device=DEVICE)
    k_max = torch.zeros_like(k_min)
    heads = torch.tensor([1, 0, 1], dtype=torch.int8, device=DEVICE)
    kv_append(k, v, slots, k_cache, v_cache, k_min, k_max, stats_heads=heads)
    assert (k_min[:, 1] == 0).all() and (k_max[:, 1] == 0).all()  # head 1 keeps no statistics
    assert (k_min[:, 0] != 0).any()


# ---- prefill ---------------------------------------------------------------------------------


def _prefill_case(page_size: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    rng = random.Random(seed)
    seq_lens = [rng.randint(page_size + 3, 5 * page_size - 1) | 1 for _ in range(3)]
    q_lens = [seq_lens[0], rng.randint(1, 40), 1]  # a whole prompt, a chunk after a prefix, one token
    seqs = PagedSeqs(seq_lens, page_size, hkv, d, dtype, seed)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn((starts[-1], hq, d), generator=gen).to(dtype).to(DEVICE)
    return seqs, q, q_lens, starts


TMA = [False] + ([True] if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9 else [])


@pytest.mark.parametrize("use_tma", TMA, ids=lambda t: "tma" if t else "ptr")
@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_dense_and_streaming_in_one_launch(page_size: int, hq: int, hkv: int, dtype: torch.dtype,
                                                   use_tma: bool) -> None:
    d, block_m = 32, 16
    seqs, q, q_lens, starts = _prefill_case(page_size, hq, hkv, d, dtype, seed=page_size + hq)
    scale = d**-0.5
    sink, local = page_size // 2 + 3, page_size + 5  # windows that cross page boundaries
    streaming = torch.tensor([i % 2 == 1 for i in range(hkv)], device=DEVICE)
    tiles = plan_tiles(q_lens, block_m, DEVICE)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    for heads in (None, streaming):
        out = torch.full_like(q, float("nan"))
        sparse_prefill(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, qsl, tiles, scale,
                       streaming_heads=heads, sink=sink, local=local, out=out, use_tma=use_tma)
        expected = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seqs.seq_lens, seqs.page_tables,
                                          scale, heads, sink, local)
        assert _rel_err(out, expected) < TOL[dtype]
    dense = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seqs.seq_lens, seqs.page_tables, scale)
    # negative: the streaming heads' output really differs from dense, the dense heads' does not
    group = hq // hkv
    stream_rows = [h for h in range(hq) if streaming[h // group]]
    dense_rows = [h for h in range(hq) if not streaming[h // group]]
    assert _rel_err(out[:, stream_rows], dense[:, stream_rows]) > 2 * TOL[dtype]
    assert _rel_err(out[:, dense_rows], dense[:, dense_rows]) < TOL[dtype]


@pytest.mark.parametrize("use_tma", TMA, ids=lambda t: "tma" if t else "ptr")
def test_prefill_explicit_page_list_with_gaps(use_tma: bool) -> None:
    page_size, hq, hkv, d, block_m = 16, 4, 2, 32, 16
    seqs, q, q_lens, starts = _prefill_case(page_size, hq, hkv, d, torch.float32, seed=11)
    tiles = plan_tiles(q_lens, block_m, DEVICE)
    seq_of_tile, row_of_tile = tiles.seq.tolist(), tiles.row_start.tolist()
    rng = random.Random(5)
    lists: dict[tuple[int, int, int], list[int]] = {}
    width = max(len(t) for t in seqs.page_tables)
    page_list = torch.zeros((tiles.num_tiles, hkv, width), dtype=torch.int32)
    page_len = torch.zeros((tiles.num_tiles, hkv), dtype=torch.int32)
    for i, (s, r0) in enumerate(zip(seq_of_tile, row_of_tile)):
        last = (seqs.seq_lens[s] - q_lens[s] + min(r0 + block_m, q_lens[s]) - 1) // page_size
        for h in range(hkv):
            chosen = sorted({0, last} | {p for p in range(last) if rng.random() < 0.5})  # gaps
            lists[(s, r0 // block_m, h)] = chosen
            page_list[i, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            page_len[i, h] = len(chosen)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, qsl, tiles, d**-0.5,
                   page_list=page_list.to(DEVICE), page_list_len=page_len.to(DEVICE), out=out, use_tma=use_tma)
    expected = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seqs.seq_lens, seqs.page_tables,
                                      d**-0.5, page_lists=lists, q_tile=block_m)
    dense = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seqs.seq_lens, seqs.page_tables, d**-0.5)
    assert _rel_err(out, expected) < TOL[torch.float32]
    assert _rel_err(out, dense) > 2 * TOL[torch.float32]


# ---- decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_dense_streaming_and_page_lists(page_size: int, hq: int, hkv: int, num_splits: int,
                                              dtype: torch.dtype) -> None:
    d = 32
    rng = random.Random(page_size * 7 + hq + num_splits)
    seq_lens = [rng.randint(2, 6 * page_size) | 1 for _ in range(3)] + [page_size * 2]
    seqs = PagedSeqs(seq_lens, page_size, hkv, d, dtype, seed=page_size + num_splits)
    gen = torch.Generator().manual_seed(page_size + 100)
    q = torch.randn((len(seq_lens), hq, d), generator=gen).to(dtype).to(DEVICE)
    scale = d**-0.5
    sink, local = page_size // 2 + 1, page_size + 7
    streaming = torch.tensor([i % 2 == 0 for i in range(hkv)], device=DEVICE)
    lists: dict[tuple[int, int], list[int]] = {}
    width = max(len(t) for t in seqs.page_tables)
    page_list = torch.zeros((len(seq_lens), hkv, width), dtype=torch.int32)
    page_len = torch.zeros((len(seq_lens), hkv), dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        last = (n - 1) // page_size
        for h in range(hkv):
            chosen = sorted({last} | {p for p in range(last) if rng.random() < 0.4})
            lists[(b, h)] = chosen
            page_list[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            page_len[b, h] = len(chosen)
    cases = [
        dict(),
        dict(streaming_heads=streaming, sink=sink, local=local),
        dict(page_list=page_list.to(DEVICE), page_list_len=page_len.to(DEVICE)),
        dict(streaming_heads=streaming, sink=sink, local=local,
             page_list=page_list.to(DEVICE), page_list_len=page_len.to(DEVICE)),
    ]
    dense = ref.sparse_decode_ref(q, seqs.k_cache, seqs.v_cache, seq_lens, seqs.page_tables, scale)
    for kw in cases:
        out = sparse_decode(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, scale, num_splits=num_splits, **kw)
        expected = ref.sparse_decode_ref(
            q, seqs.k_cache, seqs.v_cache, seq_lens, seqs.page_tables, scale,
            kw.get("streaming_heads"), sink, local, lists if "page_list" in kw else None,
        )
        assert _rel_err(out, expected) < TOL[dtype], kw.keys()
        if kw:  # negative: sparse really reads fewer keys
            assert _rel_err(out, dense) > 2 * TOL[dtype], kw.keys()


def test_merge_states_matches_reference_including_empty_splits() -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn((2, 3, 5, 32), generator=gen).to(DEVICE)
    lse = torch.randn((2, 3, 5), generator=gen).to(DEVICE) * 4
    lse[0, 1, 2:] = float("-inf")  # splits that saw no key
    got = merge_states(out, lse, torch.float32)
    assert _rel_err(got, ref.merge_states_ref(out, lse)) < 1e-5


@pytest.mark.parametrize("use_tma", TMA, ids=lambda t: "tma" if t else "ptr")
def test_prefill_streaming_window_much_wider_than_a_tile(use_tma: bool) -> None:
    """Windows spanning many KV tiles: the interior tiles take the unmasked path, the edges the masked one."""
    page_size, hq, hkv, d, block_m, block_n = 16, 4, 2, 32, 16, 16
    seq_lens = [301, 257]
    q_lens = [301, 70]
    seqs = PagedSeqs(seq_lens, page_size, hkv, d, torch.float32, seed=21)
    starts = [0, 301, 371]
    q = torch.randn((371, hq, d), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    tiles = plan_tiles(q_lens, block_m, DEVICE)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    streaming = torch.tensor([True, False], device=DEVICE)
    for sink, local in ((20, 150), (33, 64), (1, 17)):
        out = torch.full_like(q, float("nan"))
        sparse_prefill(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, qsl, tiles, d**-0.5,
                       streaming_heads=streaming, sink=sink, local=local, out=out, block_n=block_n,
                       use_tma=use_tma)
        expected = ref.sparse_prefill_ref(q, seqs.k_cache, seqs.v_cache, starts, seq_lens, seqs.page_tables,
                                          d**-0.5, streaming, sink, local)
        assert _rel_err(out, expected) < TOL[torch.float32], (sink, local)


# ---- one pool of several: kernels indexing the model's heads through a head map --------------


def test_kv_append_through_a_head_map() -> None:
    """A pool that stores model KV heads [2, 0] reads them from the full k/v (strided views too)."""
    hkv_model, d, page_size = 3, 32, 16
    gen = torch.Generator().manual_seed(5)
    head_map = torch.tensor([2, 0], device=DEVICE)
    slots = torch.tensor([0, 1, 2, 32, 33], device=DEVICE)  # each run starts its logical page
    kv = torch.randn((5, 2 * hkv_model * d + 7), generator=gen).to(DEVICE)  # a wider row: strided views
    k = kv[:, : hkv_model * d].view(5, hkv_model, d)
    v = kv[:, hkv_model * d : 2 * hkv_model * d].view(5, hkv_model, d)
    for stats in (False, True):
        k_cache = torch.full((4, page_size, 2, d), float("nan"), device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
        k_min = torch.zeros((4, 2, d), device=DEVICE) if stats else None
        k_max = torch.zeros((4, 2, d), device=DEVICE) if stats else None
        kv_append(k, v, slots, k_cache, v_cache, k_min, k_max, head_map=head_map)
        flat_k, flat_v = k_cache.view(-1, 2, d), v_cache.view(-1, 2, d)
        assert torch.equal(flat_k[slots], k[:, [2, 0]]) and torch.equal(flat_v[slots], v[:, [2, 0]])
        if stats:
            assert torch.equal(k_max[0], k[:3, [2, 0]].amax(0)) and torch.equal(k_min[2], k[3:, [2, 0]].amin(0))


@pytest.mark.parametrize("use_tma", TMA, ids=lambda t: "tma" if t else "ptr")
def test_prefill_through_a_head_map_writes_only_its_heads(use_tma: bool) -> None:
    """Two pools (KV heads [1, 3], one of them streaming, and [0, 2] of four, group 3) fill one
    output from a strided q (a view of a wider projection, as the engine's): each call equals the
    gathered-heads call and leaves the other pool's rows alone."""
    page_size, hkv, group, d, block_m = 16, 4, 3, 32, 16
    hq = hkv * group
    rng = random.Random(3)
    seq_lens = [rng.randint(page_size + 3, 5 * page_size - 1) | 1 for _ in range(3)]
    q_lens = [seq_lens[0], 23, 1]
    starts = [0, q_lens[0], q_lens[0] + q_lens[1], sum(q_lens)]
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn((starts[-1], hq + 5, d), generator=gen).to(DEVICE)
    q = wide[:, 2 : 2 + hq]  # strided rows, like q inside a fused q/k/v projection
    tiles = plan_tiles(q_lens, block_m, DEVICE)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    sink, local = 5, page_size + 7
    out = torch.full((starts[-1], hq, d), float("nan"), device=DEVICE)
    for heads, streaming in (([1, 3], [True, False]), ([0, 2], None)):
        seqs = PagedSeqs(seq_lens, page_size, len(heads), d, torch.float32, seed=heads[0] + 7)
        stream = torch.tensor(streaming, device=DEVICE) if streaming is not None else None
        kv_map = torch.tensor(heads, device=DEVICE)
        q_heads = [h * group + g for h in heads for g in range(group)]
        before = out.clone()
        sparse_prefill(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, qsl, tiles, d**-0.5,
                       streaming_heads=stream, sink=sink, local=local, out=out, use_tma=use_tma,
                       kv_head_map=kv_map, group=group)
        want = ref.sparse_prefill_ref(q[:, q_heads].contiguous(), seqs.k_cache, seqs.v_cache, starts, seqs.seq_lens,
                                      seqs.page_tables, d**-0.5, stream, sink, local)
        assert _rel_err(out[:, q_heads], want) < TOL[torch.float32]  # TF32 dot products on a GPU
        others = [h for h in range(hq) if h not in q_heads]
        assert torch.equal(out[:, others].isnan(), before[:, others].isnan())
        if streaming is not None:  # negative: the mapped streaming head is not read densely
            dense = ref.sparse_prefill_ref(q[:, q_heads].contiguous(), seqs.k_cache, seqs.v_cache, starts,
                                           seqs.seq_lens, seqs.page_tables, d**-0.5)
            assert _rel_err(out[:, q_heads[:group]], dense[:, :group]) > 2 * TOL[torch.float32]
    assert not out.isnan().any()
    with pytest.raises(ValueError, match="kv_head_map"):
        sparse_prefill(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, qsl, tiles, 1.0, kv_head_map=kv_map)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_through_a_head_map_writes_only_its_heads(num_splits: int) -> None:
    """Two pools (heads [1, 3] and [0, 2] of four KV heads, group 3) fill one output; each call
    equals the gathered-heads call and leaves the other pool's rows alone."""
    page_size, hkv, group, d = 16, 4, 3, 32
    seq_lens = [37, 5, 70]
    gen = torch.Generator().manual_seed(num_splits)
    q = torch.randn((3, hkv * group, d), generator=gen).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    for heads in ([1, 3], [0, 2]):
        seqs = PagedSeqs(seq_lens, page_size, len(heads), d, torch.float32, seed=heads[0])
        kv_map = torch.tensor(heads, device=DEVICE)
        q_heads = [h * group + g for h in heads for g in range(group)]
        before = out.clone()
        sparse_decode(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, d**-0.5, num_splits=num_splits,
                      kv_head_map=kv_map, out=out, group=group)
        want = sparse_decode(q[:, q_heads].contiguous(), seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, d**-0.5,
                             num_splits=num_splits)
        assert _rel_err(out[:, q_heads], want) < 1e-5
        others = [h for h in range(hkv * group) if h not in q_heads]
        assert torch.equal(out[:, others].isnan(), before[:, others].isnan())
    assert not out.isnan().any()
    with pytest.raises(ValueError, match="kv_head_map"):
        sparse_decode(q, seqs.k_cache, seqs.v_cache, seqs.table, seqs.lens, 1.0, kv_head_map=kv_map)
