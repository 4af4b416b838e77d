"""The decode kernel reading the page selector's store and plan directly.

`sparse_decode(selection=...)` must read the same pages as the explicit lists of
`PageSelector.select` (odd sizes; rows that select, reuse and fit the budget), and equal the
reference on those pages.
"""

from __future__ import annotations

import random

import pytest
import torch

from lserve.attention.metadata import build_metadata
from lserve.attention.page_selector import PageSelector
from lserve.ops import reference as ref
from lserve.ops.reference import store_top_pages_ref
from lserve.ops.sparse_decode import sparse_decode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAGE = 16
# float32 tl.dot runs in TF32 on a GPU; different split boundaries round differently
TOL = 2e-3 if DEVICE.type == "cuda" else 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _selector(heads: int, budget: int, interval: int, seats: int) -> PageSelector:
    return PageSelector([heads], PAGE, budget, interval, seats, DEVICE, num_dense_layers=0)


def _plan(selector: PageSelector, seq_lens: list[int], seats: list[int], ids: list[str]) -> None:
    width = max(-(-n // PAGE) for n in seq_lens)
    tables = [list(range(i * width, i * width + -(-n // PAGE))) for i, n in enumerate(seq_lens)]
    md = build_metadata([1] * len(seq_lens), seq_lens, tables, len(seq_lens), PAGE, DEVICE, seats=seats,
                        request_ids=ids)
    selector.prepare(md)
    selector.begin_forward()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_reading_the_store_equals_the_explicit_lists(num_splits: int) -> None:
    rng = random.Random(num_splits)
    hkv, group, d, budget = 2, 3, 32, 4 * PAGE
    seq_lens = [11 * PAGE + 3, 2 * PAGE + 1, 7 * PAGE]  # row 1 fits the budget
    sel = _selector(hkv, budget, 3, 3)
    _plan(sel, seq_lens, [1, 2, 0], ["r0", "r1", "r2"])
    scores = torch.randn((3, hkv, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    stored = sel.update(0, 3, lambda: scores)
    lists = sel.select(0, 3, lambda: scores)  # the same selection, spelled out as lists
    assert stored is not None and lists is not None
    tables = [rng.sample(range(40), -(-n // PAGE)) for n in seq_lens]
    k_cache = torch.randn((40, PAGE, hkv, d), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    v_cache = torch.randn_like(k_cache)
    table = torch.zeros((3, 12), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    q = torch.randn((3, hkv * group, d), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, table.to(DEVICE), lens, d**-0.5)
    got = sparse_decode(*args, selection=stored, num_splits=num_splits)
    want = sparse_decode(*args, page_list=lists[0], page_list_len=lists[1], num_splits=num_splits)
    assert torch.equal(got, want)  # the same pages in the same order: the same bits
    listed = {(b, h): lists[0][b, h, : int(lists[1][b, h])].tolist() for b in range(3) for h in range(hkv)}
    expected = ref.sparse_decode_ref(q, k_cache, v_cache, seq_lens, tables, d**-0.5, page_lists=listed)
    assert _rel(got, expected) < TOL
    dense = sparse_decode(*args, num_splits=num_splits)
    assert _rel(got[0], dense[0]) > 10 * TOL  # negative: row 0 really reads fewer pages
    assert _rel(got[1], dense[1]) < TOL  # row 1 fits: every page


@pytest.mark.parametrize("store", ["reference", "kernel"])
def test_local_window_and_sink_page_are_kept_whatever_their_scores(store: str) -> None:
    """`selection_local_tokens`: page 0 and the pages of the last N tokens before the newest page
    are stored first, out of the same budget, by the reference store and by the kernel; without
    the window the same scores keep other pages (negative test); a row that fits reads all."""
    from lserve.ops.page_scores import store_top_pages

    store_fn = store_top_pages_ref if store == "reference" else store_top_pages
    hkv, budget = 3, 6 * PAGE  # keep = 5 older pages besides the newest
    seq_lens = [13 * PAGE + 3, 7 * PAGE + 2, 3 * PAGE]  # newest pages 13 and 7; row 2 fits
    scores = torch.randn((3, hkv, 14), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    scores[:, :, 0] = -50.0  # the sink and the local pages score lowest of all
    scores[0, :, 11:13] = -60.0
    scores[1, :, 5:7] = -60.0
    stored = {}
    for local in (0, 2 * PAGE - 5):  # 27 tokens: two pages
        sel = PageSelector([hkv], PAGE, budget, 1, 3, DEVICE, local_tokens=local)
        _plan(sel, seq_lens, [2, 0, 1], ["a", "b", "c"])
        got = sel.update(0, 3, lambda: scores.clone(), store_fn=store_fn)
        assert got is not None
        stored[local] = got.store[[2, 0]].tolist()  # the seats of rows 0 and 1
    for h in range(hkv):
        best0 = scores[0, h, 1:11].topk(2).indices.add(1).tolist()
        assert stored[27][0][h] == sorted([0, 11, 12, *best0])
        best1 = scores[1, h, 1:5].topk(2).indices.add(1).tolist()
        assert stored[27][1][h] == sorted([0, 5, 6, *best1])
        assert not {0, 11, 12} & set(stored[0][0][h])  # negative: the plain top-k drops them
        assert stored[0][0][h] == sorted(scores[0, h, :13].topk(5).indices.tolist())


def test_local_window_needs_room_in_the_budget() -> None:
    from lserve.config import SparseConfig

    with pytest.raises(ValueError, match="too few for the first page and selection_local_tokens=64"):
        PageSelector([2], PAGE, 4 * PAGE, 1, 2, DEVICE, local_tokens=4 * PAGE)
    PageSelector([2], PAGE, 6 * PAGE, 1, 2, DEVICE, local_tokens=4 * PAGE)  # 1 + 4 of 5: fits
    with pytest.raises(ValueError, match="does not combine with selection_top_p"):
        SparseConfig(token_budget=512, selection_top_p=0.9, selection_local_tokens=128)
    with pytest.raises(ValueError, match="selection_local_tokens"):
        SparseConfig(token_budget=512, selection_local_tokens=-1)
