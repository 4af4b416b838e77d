"""Page scoring and selection (dynamic sparsity) against brute-force references."""

from __future__ import annotations

import random

import pytest
import torch

from lserve.ops import reference as ref
from lserve.ops.page_scores import page_scores
from lserve.ops.paged_inputs import PLAN_ROWS, PlanRow
from tests.helpers_paging import shuffled_tables

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("page_size,logical", [(16, 16), (64, 16), (32, 8)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("aggregate", ["max", "sum"])
def test_page_scores_match_reference(page_size: int, logical: int, hq: int, hkv: int, aggregate: str) -> None:
    d = 32
    gen = torch.Generator().manual_seed(page_size + hq)
    rng = random.Random(page_size * hq)
    seq_lens = [rng.randint(1, 7 * page_size) for _ in range(3)] + [page_size * 3]
    tables, num_pages, table = shuffled_tables(seq_lens, page_size, rng, spare=4)
    rows = num_pages * page_size // logical
    k_min = torch.randn((rows, hkv, d), generator=gen)
    k_max = k_min + torch.rand((rows, hkv, d), generator=gen)
    # stale statistics past each sequence's end must not count: make them huge
    for n, pages in zip(seq_lens, tables):
        first_unused = -(-n // logical) * logical
        for pos in range(first_unused, len(pages) * page_size, logical):
            k_max[pages[pos // page_size] * (page_size // logical) + (pos % page_size) // logical] = 1e4
    q = torch.randn((len(seq_lens), hq, d), generator=gen)
    got = page_scores(q.to(DEVICE), k_min.to(DEVICE), k_max.to(DEVICE), table.to(DEVICE),
                      torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), page_size, logical, aggregate)
    expected = ref.page_scores_ref(q, k_min, k_max, tables, seq_lens, page_size, logical, aggregate)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got.cpu()), finite)
    torch.testing.assert_close(got.cpu()[finite].double(), expected[finite], rtol=2e-3, atol=2e-3)


def test_score_is_an_upper_bound_of_every_key_in_the_page() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn((16, 1, 32), generator=gen)
    q = torch.randn((1, 1, 32), generator=gen)
    k_min, k_max = keys.amin(0, keepdim=True), keys.amax(0, keepdim=True)
    score = page_scores(q.to(DEVICE), k_min.to(DEVICE), k_max.to(DEVICE), torch.zeros((1, 1), dtype=torch.int32,
                        device=DEVICE), torch.tensor([16], dtype=torch.int32, device=DEVICE), 16, 16)
    assert float(score) >= float((keys[:, 0] @ q[0, 0]).max()) - 1e-4


def test_page_scores_through_a_head_map_equal_the_gathered_heads() -> None:
    """One pool of several: its statistics hold model KV heads 2 and 0; q holds all 4 KV heads' query
    heads (a strided view, as the projection gives it)."""
    gen = torch.Generator().manual_seed(5)
    group, d, page, logical = 3, 32, 32, 8
    seq_lens = [5 * page + 7, 2 * page]
    rows = 8 * page // logical
    k_min = torch.randn((rows, 2, d), generator=gen)
    k_max = k_min + torch.rand((rows, 2, d), generator=gen)
    qkv = torch.randn((2, 4 * group + 5, d), generator=gen)
    q = qkv[:, : 4 * group]  # not contiguous over the batch
    table = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 0, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    heads = torch.tensor([2, 0])
    picked = torch.cat([q[:, 2 * group: 3 * group], q[:, :group]], dim=1)
    args = (k_min.to(DEVICE), k_max.to(DEVICE), table.to(DEVICE), lens.to(DEVICE), page, logical, "sum")
    got = page_scores(q.to(DEVICE), *args, kv_head_map=heads.to(DEVICE), group=group)
    want = page_scores(picked.contiguous().to(DEVICE), *args)
    assert torch.equal(got, want)
    assert torch.isinf(got[1, :, 2:]).all() and torch.isfinite(got[0]).all()
    with pytest.raises(ValueError, match="group"):
        page_scores(q.to(DEVICE), *args, kv_head_map=heads.to(DEVICE))


def _plan(redo: list[int], anchor: list[int], seats: list[int], spare: int = 2) -> torch.Tensor:
    """The selector's plan (rows by `PlanRow`), with spare columns."""
    n = len(redo)
    plan = torch.zeros((PLAN_ROWS, n + spare), dtype=torch.int64)
    plan[PlanRow.RECOMPUTE, :n] = torch.tensor(redo)
    plan[PlanRow.NUM_PAGES, :n] = torch.tensor(anchor) + 1
    plan[PlanRow.ANCHOR, :n] = torch.tensor(anchor)
    plan[PlanRow.SEAT, :n] = torch.tensor(seats)
    return plan


@pytest.mark.parametrize("width,keep,fanout", [(37, 5, 8), (130, 1, 8), (9, 7, 8), (1030, 63, 8), (1030, 63, 2),
                                               (130, 20, 4), (300, 40, 32)])
def test_store_top_pages_equals_the_reference_and_brute_force(width: int, keep: int, fanout: int) -> None:
    from lserve.ops.page_scores import store_top_pages

    gen = torch.Generator().manual_seed(width)
    rng = random.Random(width)
    rows, heads, seats = 4, 3, 6
    scores = torch.randn((rows, heads, width), generator=gen) * 50
    scores[0, 0, : width // 2] = 1.5  # ties: the lower pages win
    scores[1, 1] = -scores[1, 1].abs() - 1  # every score negative
    scores[2, :, -3:] = float("-inf")  # past the sequence
    scores[3, 0] = 7.0  # every score tied
    scores[1, 2] = 1.0 + torch.arange(width) * 1e-6  # close scores: many search rounds
    scores[2, 1, ::3] = 2.5  # a third of the pages tied (below the cut)
    # a tie group across the cut: keep // 2 pages above it, keep + 1 tied, the rest below
    anchor_row0 = width - 1
    spots = torch.randperm(anchor_row0, generator=gen)
    above, tied = keep // 2, keep + 1
    scores[0, 1] = -100.0
    scores[0, 1, spots[:above]] = 100.0
    scores[0, 1, spots[above : above + tied]] = 50.0
    anchor = [anchor_row0, rng.randint(keep, width - 1), max(width - 4, keep), rng.randint(keep, width - 1)]
    redo = [1, 1, 1, 0] if width < 100 else [1, 1, 1, 1]  # a row that reuses: its store row must stay
    seat_ids = [4, 0, 5, 2]
    plan = _plan(redo, anchor, seat_ids)
    store = torch.randint(0, 1000, (seats + 1, heads, keep + 2), generator=gen, dtype=torch.int32)
    want = store.clone()
    ref.store_top_pages_ref(scores, plan, want, keep)
    got = store.clone().to(DEVICE)  # (a copy: `store` stays the "before" state)
    store_top_pages(scores.to(DEVICE), plan.to(DEVICE), got, keep, fanout=fanout)
    assert torch.equal(got.cpu(), want)
    for b in range(rows):
        for h in range(heads):
            row = want[seat_ids[b], h]
            if not redo[b]:
                assert torch.equal(row, store[seat_ids[b], h])
                continue
            ranked = sorted(range(anchor[b]), key=lambda p: (-float(scores[b, h, p]), p))
            assert row[:keep].tolist() == sorted(ranked[:keep])
            assert torch.equal(row[keep:], store[seat_ids[b], h, keep:])  # nothing past keep
    untouched = [s for s, r in zip(seat_ids, redo) if not r] + [s for s in range(seats + 1) if s not in seat_ids]
    assert torch.equal(want[untouched], store[untouched])


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),  # the CPU interpreter's bf16 matmul is wrong
    torch.float16,
])
def test_page_scores_in_half_precision_equal_the_float64_bound(dtype: torch.dtype) -> None:
    """The engine's statistics and queries are bf16/fp16: products are exact in the float32 sums."""
    gen = torch.Generator().manual_seed(7)
    page, logical, hq, hkv, d = 64, 16, 8, 2, 64
    seq_lens = [5 * page + 9]
    k_min = torch.randn((6 * page // logical, hkv, d), generator=gen).to(dtype)
    k_max = (k_min.float() + torch.rand(k_min.shape, generator=gen)).to(dtype)
    q = torch.randn((1, hq, d), generator=gen).to(dtype)
    table = [[3, 0, 5, 1, 4, 2]]
    got = page_scores(q.to(DEVICE), k_min.to(DEVICE), k_max.to(DEVICE), torch.tensor(table, dtype=torch.int32,
                      device=DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), page, logical, "sum")
    want = ref.page_scores_ref(q, k_min, k_max, table, seq_lens, page, logical, "sum")
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width,keep,p", [(37, 9, 0.5), (130, 20, 0.9), (300, 40, 0.99), (20, 6, 1.0)])
def test_store_top_pages_with_top_p_equals_the_reference(width: int, keep: int, p: float) -> None:
    """Top-p: page 0 plus the fewest best older pages carrying p of the estimated mass (with the
    tail's), within [min_keep, keep]; counts per (seat, head); reused rows untouched."""
    from lserve.ops.page_scores import store_top_pages
    from lserve.ops.paged_inputs import TopP

    gen = torch.Generator().manual_seed(width + keep)
    rows, heads, seats = 4, 3, 6
    scores = torch.randn((rows, heads, width), generator=gen) * 3
    scores[0, 0, 5] = 40.0  # one page carries nearly all the mass: the floor decides
    scores[1, 1] = 0.0  # flat: the budget decides
    scores[2, :, -4:] = float("-inf")  # past the sequence
    anchor = [width - 1, width - 2, width - 6, width - 3]
    redo = [1, 1, 1, 0]
    seat_ids = [4, 0, 5, 2]
    plan = _plan(redo, anchor, seat_ids)
    plan[2, :4] = torch.tensor([width, width, width - 4, width])  # pages of each sequence
    store = torch.randint(0, 1000, (seats + 1, heads, keep), generator=gen, dtype=torch.int32)
    counts = torch.full((seats + 1, heads), -1, dtype=torch.int32)
    want, want_counts = store.clone(), counts.clone()
    ref.store_top_pages_ref(scores, plan, want, keep, top_p=TopP(p, 0.5, 3, want_counts))
    got, got_counts = store.clone().to(DEVICE), counts.clone().to(DEVICE)
    store_top_pages(scores.to(DEVICE), plan.to(DEVICE), got, keep, top_p=TopP(p, 0.5, 3, got_counts))
    assert torch.equal(got_counts.cpu(), want_counts)
    for b, seat in enumerate(seat_ids):
        for h in range(heads):
            n = int(want_counts[seat, h])
            if not redo[b]:
                assert n == -1 and torch.equal(got[seat, h].cpu(), store[seat, h])
                continue
            assert 3 <= n <= keep and got[seat, h, 0] == 0  # the sink page first
            assert torch.equal(got[seat, h, :n].cpu(), want[seat, h, :n])
    assert want_counts[0, 1] == keep  # flat scores: the budget
    if p == 1.0:
        assert (want_counts[[4, 0, 5]] == keep).all()
    else:
        assert want_counts[4, 0] == 3  # one page carries the mass: the floor
