"""The ring pool for streaming heads and decode page selection, in both backends, against references.

An engine-like simulation: two sequences prefill in chunks and then decode, their streaming heads
in ring pages taken and returned as their windows move (pages one sequence returns, the other
takes) and their dense heads reading pages chosen by the selector
(re-selected every `INTERVAL` steps). Every layer's output is compared with a brute-force
reference computed on a separate cache that keeps the whole history of every head: the Λ mask
for streaming heads, and for dense heads the pages a from-scratch Quest selection would pick.
"""

from __future__ import annotations

import random

import pytest
import torch

from lserve.attention.metadata import build_metadata
from lserve.attention.page_selector import PageSelector
from lserve.attention.sparsity import HeadSparsity
from lserve.attention.torch_backend import (
    TorchAttentionBackend,
    page_scores_torch,
    update_key_stats,
    write_kv,
)
from lserve.attention.triton_backend import TritonAttentionBackend
from lserve.kv_cache.fp8 import FP8_DTYPE, as_bytes
from lserve.kv_cache.layout import KVCache, KVCacheTensors, KVShape, RingGeometry
from lserve.kv_cache.ring_pages import RingPages, pool_tensor_pages
from lserve.ops import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 5e-3 if DEVICE.type == "cuda" else 1e-4

PAGE, LOGICAL, D, HQ, HKV = 16, 8, 32, 8, 4
MAX_CHUNK = 24
INTERVAL = 3
DENSE_LAYERS = 1  # layer 0 reads every page; layer 2 selects (layer 1 has only streaming heads)
FLAGS = ([True, False, True, False], [True, True, True, True], [False, True, False, False])
WINDOWS = dict(prefill_sink=5, prefill_local=20, decode_sink=3, decode_local=13)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def brute_force_pages(q: torch.Tensor, keys: torch.Tensor, seq_len: int, keep: int, anchor: int) -> list[int]:
    """The `keep` older pages (< anchor) with the highest Quest bound of q (G, D) over keys (L, D),
    summed over the GQA group."""
    scores = []
    for p in range(anchor):
        best = float("-inf")
        for start in range(p * PAGE, min((p + 1) * PAGE, seq_len), LOGICAL):
            block = keys[start : min(start + LOGICAL, seq_len)].double()
            lo, hi = block.amin(0), block.amax(0)
            bound = torch.maximum(q.double() * hi, q.double() * lo).sum(-1).sum()  # summed over the GQA group
            best = max(best, float(bound))
        scores.append((best, p))
    return sorted(p for _, p in sorted(scores, reverse=True)[:keep])


LABEL_CHANNELS = [[1, 7, 16, 30], [0, 2, 4, 6], [31, 9, 17, 3], [5, 8, 13, 21]]  # per model KV head


class RingSim:
    def __init__(self, backend_cls: type, token_budget: int, seed: int, score: str = "quest",
                 top_p: float | None = None, fp8: bool = False) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        flags = tuple(torch.tensor(f, device=DEVICE) for f in FLAGS)
        self.sparsity = HeadSparsity(flags, **WINDOWS)
        self.geometry = RingGeometry(PAGE, 5, WINDOWS["decode_local"], WINDOWS["prefill_local"])
        n_stream = tuple(sum(f) for f in FLAGS)
        kv_dtype = FP8_DTYPE if fp8 else None
        shape = KVShape(3, HKV, D, PAGE, torch.float32, tuple(HKV - n for n in n_stream), kv_dtype)
        if score in ("quest", "midrange"):
            paged = KVCacheTensors(shape, 30, DEVICE, LOGICAL)
        else:  # a channel score: labels of each layer's dense heads
            chans = [torch.tensor([LABEL_CHANNELS[h] for h, s in enumerate(f) if not s], dtype=torch.int32)
                     .view(-1, 4) for f in FLAGS]
            paged = KVCacheTensors(shape, 30, DEVICE, label_channels=chans)
        ring = KVCacheTensors(KVShape(3, HKV, D, PAGE, torch.float32, n_stream, kv_dtype),
                              pool_tensor_pages(self.geometry.pool_pages(2, 2 * MAX_CHUNK, 400)), DEVICE)
        for t in (*paged.k, *paged.v, *ring.k, *ring.v):
            as_bytes(t).fill_(0x7F if fp8 else float("nan"))  # (0x7F: E4M3's NaN)
        for t in (*(paged.k_scale or []), *(paged.v_scale or []), *(ring.k_scale or []), *(ring.v_scale or [])):
            t.fill_(float("nan"))
        self.cache = KVCache(paged, ring, flags, self.geometry)
        self.ring_pages = RingPages(self.geometry, ring)  # (zeroes its null page: the rest stays NaN)
        self.ring_uses: set[tuple[int, int, int]] = set()
        """(sequence, logical page, ring page) of every page a sequence held"""
        self.selector = None
        if token_budget:
            self.selector = PageSelector([HKV - n for n in n_stream], PAGE, token_budget, INTERVAL, 2, DEVICE,
                                         num_dense_layers=DENSE_LAYERS, aggregate="sum", score=score, top_p=top_p,
                                         min_tokens=2 * PAGE, temperature=D**-0.5 / 2)
        self.backend = backend_cls(self.cache, HQ, D**-0.5, self.sparsity, self.selector)
        # the full history of every head, for the references
        self.full = KVCacheTensors(KVShape(3, HKV, D, PAGE, torch.float32), 30, DEVICE)
        pool = list(range(30))
        rng.shuffle(pool)
        self.tables = [[pool.pop() for _ in range(8)], [pool.pop() for _ in range(8)]]
        self.seats = [1, 0]

    def step(self, plan: list[tuple[int, int, int]], num_decodes: int):
        """plan: (sequence, tokens before, new tokens) -> per layer (q, out, md)."""
        qlens = [n for _, _, n in plan]
        seq_lens = [b + n for _, b, n in plan]
        seqs = [s for s, _, _ in plan]
        seats = [self.seats[s] for s in seqs]
        for i, (seat, (_, before, n)) in enumerate(zip(seats, plan)):
            self.ring_pages.prepare(seat, before, before + n, prefill=i >= num_decodes)
        ring_table = self.ring_pages.rows(seats, 8)
        for seq, seat, (_, before, n) in zip(seqs, seats, plan):
            self.ring_uses.update((seq, logical, page) for logical, page in self.ring_pages.held(seat).items())
            self.ring_pages.trim(seat, before + n, prefill_next=before + n < PROMPTS[seq] - 1)
        self.ring_pages.check_invariants()
        md = build_metadata(qlens, seq_lens, [self.tables[s] for s in seqs], num_decodes, PAGE, DEVICE,
                            seats=seats, ring_table=ring_table, request_ids=[f"r{s}" for s in seqs])
        self.backend.prepare(md)
        t = sum(qlens)
        per_layer = []
        for layer in range(3):
            q = torch.randn((t, HQ, D), generator=self.gen).to(DEVICE)
            k = torch.randn((t, HKV, D), generator=self.gen).to(DEVICE)
            v = torch.randn((t, HKV, D), generator=self.gen).to(DEVICE)
            write_kv(self.full.k[layer], self.full.v[layer], k, v, md.slot_mapping)
            per_layer.append((q, self.backend.forward(q, k, v, layer, md)))
        return md, seqs, seq_lens, per_layer


PROMPTS = (80, 30)  # each sequence's prompt length: it prefills until then, then decodes


def _schedule() -> list[tuple[list[tuple[int, int, int]], int]]:
    """Seq 0: an 80-token prompt in chunks of 24 while seq 1 (a 30-token prompt) starts decoding."""
    steps = [([(1, 0, 24), (0, 0, 24)], 0), ([(1, 24, 6), (0, 24, 24)], 0), ([(1, 30, 1), (0, 48, 24)], 1)]
    steps.append(([(1, 31, 1), (0, 72, 8)], 1))
    for i in range(14):  # both decode, past the ring's length and across page boundaries
        steps.append(([(0, 80 + i, 1), (1, 32 + i, 1)], 2))
    return steps


_RUNS: dict[tuple, tuple] = {}


def _run(backend_cls: type, token_budget: int, seed: int = 0, **selection):
    """The schedule run through a fresh `RingSim`; runs are deterministic, so one with the same
    arguments is computed once per module and shared (the tests only read them)."""
    key = (backend_cls, token_budget, seed, tuple(sorted(selection.items())))
    if key not in _RUNS:
        sim = RingSim(backend_cls, token_budget, seed, **selection)  # (selection: score, top_p, fp8)
        _RUNS[key] = sim, [sim.step(plan, nd) for plan, nd in _schedule()]
    return _RUNS[key]


def _check_against_reference(sim: RingSim, steps, token_budget: int) -> list[dict]:
    sp = sim.sparsity
    keep = token_budget // PAGE - 1
    state: dict[int, tuple[int, int]] = {}  # seq -> (anchor, age) of its live selection
    last_top: dict[tuple[int, int, int], list[int]] = {}  # (seq, layer, head) -> its stored older pages
    chosen_log = []
    for md, seqs, seq_lens, per_layer in steps:
        nd = md.num_decodes
        tables = [sim.tables[s] for s in seqs]
        lists: dict[int, dict[tuple[int, int], list[int]]] = {layer: {} for layer in range(3)}
        if token_budget:
            for b in range(nd):
                n = -(-seq_lens[b] // PAGE)
                if n <= token_budget // PAGE:
                    state.pop(seqs[b], None)
                    continue
                old = state.get(seqs[b])
                if old is None or old[1] + 1 >= INTERVAL or n - old[0] > sim.selector.tail_width:
                    state[seqs[b]] = (n - 1, 0)
                    for layer, (q, _) in enumerate(per_layer):
                        if layer < DENSE_LAYERS:
                            continue
                        keys = ref.gather_sequence(sim.full.k[layer], tables[b], seq_lens[b])
                        for h in range(HKV):
                            top = brute_force_pages(q[b, 2 * h : 2 * h + 2], keys[:, h], seq_lens[b], keep, n - 1)
                            lists[layer][(b, h)] = top
                    chosen_log.append({"seq": seqs[b], "len": seq_lens[b], "recompute": True})
                else:
                    state[seqs[b]] = (old[0], old[1] + 1)
                    chosen_log.append({"seq": seqs[b], "len": seq_lens[b], "recompute": False})
                anchor = state[seqs[b]][0]
                for layer in range(DENSE_LAYERS, 3):
                    for h in range(HKV):
                        top = lists[layer].get((b, h), last_top.get((seqs[b], layer, h), []))
                        last_top[(seqs[b], layer, h)] = top
                        lists[layer][(b, h)] = sorted(set(top) | set(range(anchor, n)))
        for layer, (q, out) in enumerate(per_layer):
            flags = sp.streaming_heads[layer]
            if nd:
                exp = ref.sparse_decode_ref(q[:nd], sim.full.k[layer], sim.full.v[layer], seq_lens[:nd], tables[:nd],
                                            D**-0.5, flags, sp.decode_sink, sp.decode_local, lists[layer] or None)
                assert _rel(out[:nd], exp) < 1e-5, (layer, seq_lens)
            if md.num_prefills:
                starts = [0]
                for n in md.query_lens_cpu:
                    starts.append(starts[-1] + n)
                pre = slice(starts[nd], starts[-1])
                exp = ref.sparse_prefill_ref(q[pre], sim.full.k[layer], sim.full.v[layer],
                                             [s - starts[nd] for s in starts[nd:]], seq_lens[nd:], tables[nd:],
                                             D**-0.5, flags, sp.prefill_sink, sp.prefill_local)
                assert _rel(out[pre], exp) < 1e-5, (layer, seq_lens)
    return chosen_log


@pytest.mark.parametrize("token_budget", [0, 3 * PAGE], ids=["ring", "ring+selection"])
def test_torch_backend_ring_pool_and_selection_match_the_reference(token_budget: int) -> None:
    sim, steps = _run(TorchAttentionBackend, token_budget)
    log = _check_against_reference(sim, steps, token_budget)
    # pages returned behind a window were taken again, one of them by the other sequence
    assert len({page for _, _, page in sim.ring_uses}) < len(sim.ring_uses)
    holders = {}
    for seq, _, page in sim.ring_uses:
        holders.setdefault(page, set()).add(seq)
    assert any(len(seqs) == 2 for seqs in holders.values())
    if token_budget:
        # seq 0 decodes 14 steps past the budget: selections on steps 0, 3, 6, 9, 12 of its own count
        recomputes = [e["recompute"] for e in log if e["seq"] == 0]
        assert recomputes == [i % INTERVAL == 0 for i in range(14)]
        assert sim.selector.num_selections["r0"] == 5


SELECTIONS = {
    "ring": (0, {}),
    "quest": (3 * PAGE, {}),
    "midrange": (3 * PAGE, dict(score="midrange")),
    "rope_channels": (3 * PAGE, dict(score="rope_channels")),
    "rope_mass": (3 * PAGE, dict(score="rope_mass")),
    "top-p": (4 * PAGE, dict(score="rope_channels", top_p=0.3)),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_triton_backend_matches_the_torch_backend(name: str) -> None:
    budget, selection = SELECTIONS[name]
    sim_a, a = _run(TorchAttentionBackend, budget, **selection)
    sim_b, b = _run(TritonAttentionBackend, budget, **selection)
    for (_, _, _, la), (_, _, _, lb) in zip(a, b):
        for (_, out_a), (_, out_b) in zip(la, lb):
            assert _rel(out_b, out_a) < TOL
    if selection.get("top_p"):
        counts_a, counts_b = sim_a.selector._counts, sim_b.selector._counts
        assert torch.equal(counts_a.cpu(), counts_b.cpu())
        kept = counts_a[DENSE_LAYERS:, :2][counts_a[DENSE_LAYERS:, :2] > 0]
        assert kept.numel() and int(kept.min()) < 3  # p = 0.3 keeps fewer pages than the budget's 3 somewhere


@pytest.mark.parametrize("name", ["quest", "rope_mass", "top-p"])
def test_fp8_pools_select_the_same_pages_and_the_backends_agree(name: str) -> None:
    """Both pools in FP8, on the inputs of the model-dtype run: the selector stores exactly the
    same pages (its statistics and labels come from the unquantized keys), both backends give the
    same outputs, and those are within FP8's error of the model-dtype outputs but not equal to
    them (the pools really hold FP8)."""
    budget, selection = SELECTIONS[name]
    plain, out_plain = _run(TorchAttentionBackend, budget, **selection)
    fp8_torch, out_torch = _run(TorchAttentionBackend, budget, fp8=True, **selection)
    fp8_triton, out_triton = _run(TritonAttentionBackend, budget, fp8=True, **selection)
    if budget:
        for sim in (fp8_torch, fp8_triton):
            for a, b in zip(plain.selector._store, sim.selector._store):
                assert a is None and b is None or torch.equal(a.cpu(), b.cpu())
            assert sim.selector.num_selections == plain.selector.num_selections
    worst = 0.0
    for (_, _, _, la), (_, _, _, lt), (_, _, _, lg) in zip(out_plain, out_torch, out_triton):
        for (_, a), (_, t), (_, g) in zip(la, lt, lg):
            assert _rel(g, t) < TOL
            worst = max(worst, _rel(t, a))
    assert 1e-3 < worst < 0.1


@pytest.mark.parametrize("score", ["quest", "midrange", "rope_channels", "rope_mass"])
def test_selection_changes_the_output_and_a_large_budget_does_not(score: str) -> None:
    """Negative test: a small budget is not silently dense; a budget over the context is exact."""
    _, dense = _run(TorchAttentionBackend, 0)
    _, small = _run(TorchAttentionBackend, 3 * PAGE, score=score)
    _, large = _run(TorchAttentionBackend, 512, score=score)
    last = -1  # the final decode step: both sequences are far past 3 pages
    diffs = [_rel(s[1][:2], d[1][:2]) for s, d in zip(small[last][3], dense[last][3])]
    assert max(diffs) > 1e-2
    for s, d in zip(large[last][3], dense[last][3]):
        assert torch.equal(s[1], d[1])


def test_top_p_of_one_keeps_the_budget_and_a_low_p_reads_less() -> None:
    """p = 1 with a budget over the context is dense exactly; p = 1 under it stores the whole
    budget, page 0 first; p = 0.05 keeps the floor and changes the output (not silently dense)."""
    _, dense = _run(TorchAttentionBackend, 0)
    _, over = _run(TorchAttentionBackend, 512, score="rope_channels", top_p=1.0)
    for (_, _, _, ld), (_, _, _, lo) in zip(dense, over):
        for (_, a), (_, b) in zip(ld, lo):
            assert torch.equal(a, b)
    keep = 3
    full, _ = _run(TorchAttentionBackend, (keep + 1) * PAGE, score="rope_channels", top_p=1.0)
    low, out = _run(TorchAttentionBackend, (keep + 1) * PAGE, score="rope_channels", top_p=0.05)
    for sim, want in ((full, keep), (low, 1)):  # the floor: 2 pages of tokens, the newest one included
        selecting = sim.selector._counts[2, 1, :3]  # seq 0 (seat 1) in the selecting layer with dense heads
        assert selecting.unique().tolist() == [want]
        assert (sim.selector._store[2][1, :3, 0] == 0).all()  # page 0 is always kept
    assert max(_rel(s[1][:2], d[1][:2]) for s, d in zip(out[-1][3], dense[-1][3])) > 1e-2


def test_ring_pool_memory_is_constant_in_context_length() -> None:
    geo = RingGeometry(64, sink_tokens=128, local_tokens=256, prefill_local_tokens=8192)
    assert geo.pages_per_seq == 2 + 4 + 1  # sink pages + the decode window's; independent of the context
    assert geo.pages_between_steps(prefill=True) == 2 + 128 + 1
    assert geo.live_pages(200_000, 200_001, prefill=False) == (2, (200_000 - 255) // 64, -(-200_001 // 64))
    assert geo.live_pages(200_000, 208_192, prefill=True) == (2, (200_000 - 8191) // 64, 208_192 // 64)
    assert geo.live_pages(10, 100, prefill=True) == (2, 2, 2)  # a short sequence: its pages are sink pages
    # 64 sequences and steps of 8,192 new tokens: their decode windows, one prefill window and one
    # step's chunks, not a prefill window and a chunk per sequence
    assert geo.pool_pages(64, 8192, 262_144) == 64 * 7 + 131 + 128
    assert geo.pool_pages(4, 8192, 1024) == 4 * 16  # never more than the whole contexts


def test_key_statistics_across_page_boundaries_in_decode() -> None:
    """Prefill then one token at a time: the torch statistics equal the op reference after every step."""
    gen = torch.Generator().manual_seed(5)
    rows = 4 * PAGE // LOGICAL
    k_cache = torch.zeros((4, PAGE, 2, D))
    mins = [torch.full((rows, 2, D), 7.0) for _ in range(2)]  # stale values from an earlier owner
    maxs = [torch.full((rows, 2, D), -7.0) for _ in range(2)]
    pages = [2, 0, 3]
    pos = list(range(13))
    for step in range(30):
        slots = torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in pos])
        k = torch.randn((len(pos), 2, D), generator=gen)
        ref.kv_append_ref(k, k, slots, k_cache, k_cache.clone(), mins[0], maxs[0], LOGICAL)
        update_key_stats(mins[1], maxs[1], k, slots, LOGICAL)
        assert torch.equal(mins[0], mins[1]) and torch.equal(maxs[0], maxs[1]), step
        pos = [pos[-1] + 1]


def test_page_scores_torch_equals_the_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    rows = 10 * PAGE // LOGICAL
    k_min = torch.randn((rows, 2, D), generator=gen)
    k_max = k_min + torch.rand((rows, 2, D), generator=gen)
    q = torch.randn((2, 6, D), generator=gen)
    tables = [[3, 1, 7, 2], [5, 0, 9, 0]]
    seq_lens = [57, 35]
    for aggregate in ("max", "sum"):
        got = page_scores_torch(q, k_min, k_max, torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens),
                                PAGE, LOGICAL, aggregate)
        exp = ref.page_scores_ref(q, k_min, k_max, tables, seq_lens, PAGE, LOGICAL, aggregate)
        assert torch.allclose(got.double(), exp, atol=1e-4), aggregate
