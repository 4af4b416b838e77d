"""The fused page-selection kernels against the page selector's PyTorch path.

`ops.page_select.select_top_pages_` (the "select" step's top-k in one launch) must write the same
stored pages as `PageSelector.update` without it, and `sparse_decode(selection=...)` (the decode
kernel reading the selector's store and plan) must read the same pages as the explicit lists of
`PageSelector.select`. Odd sizes, mixed rows (re-selecting, reusing, fitting the budget).
"""

from __future__ import annotations

import random

import pytest
import torch

from lserve.attention.metadata import build_metadata
from lserve.attention.page_selector import PageSelector
from lserve.ops import reference as ref
from lserve.ops.page_select import select_top_pages_
from lserve.ops.sparse_decode import sparse_decode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAGE = 16


def _selector(heads: int, budget: int, interval: int, seats: int) -> PageSelector:
    return PageSelector([heads], PAGE, budget, interval, seats, DEVICE, num_dense_layers=0)


def _plan(selector: PageSelector, seq_lens: list[int], seats: list[int], ids: list[str]) -> None:
    width = max(-(-n // PAGE) for n in seq_lens)
    tables = [list(range(i * width, i * width + -(-n // PAGE))) for i, n in enumerate(seq_lens)]
    md = build_metadata([1] * len(seq_lens), seq_lens, tables, len(seq_lens), PAGE, DEVICE, seats=seats,
                        request_ids=ids)
    selector.prepare(md)
    selector.begin_forward()


@pytest.mark.parametrize("pages", [9, 37, 130])
def test_top_pages_kernel_equals_the_torch_update(pages: int) -> None:
    heads, budget = 3, 5 * PAGE  # keep 4 older pages + the newest
    gen = torch.Generator().manual_seed(pages)
    seq_lens = [pages * PAGE - 5, 3 * PAGE, pages * PAGE // 2 + PAGE + 1, pages * PAGE]  # row 1 fits the budget
    seats, ids = [2, 0, 3, 1], ["a", "b", "c", "d"]
    fused, plain = _selector(heads, budget, 4, 4), _selector(heads, budget, 4, 4)
    for step in range(3):  # step 0 selects for every row; then rows reuse (interval 4) ...
        if step == 2:  # ... except "c", which moved to a new seat and must re-select
            seats = [2, 0, 4, 1]
        for sel in (fused, plain):
            _plan(sel, seq_lens, seats, ids)
        scores = torch.randn((4, heads, pages), generator=gen).to(DEVICE)
        scores[:, :, 0] = float("inf") if step == 1 else scores[:, :, 0]  # would win if it were re-selected
        a = fused.update(0, 4, lambda: scores, select_top_pages_)
        b = plain.update(0, 4, lambda: scores)
        assert a is not None and b is not None
        assert torch.equal(a.store, b.store), f"step {step}"
    assert fused.plan is not None and fused.plan.recompute == (False, False, True, False)


def test_top_pages_kernel_negative_a_row_that_fits_or_reuses_is_not_touched() -> None:
    sel = _selector(2, 3 * PAGE, 2, 2)
    _plan(sel, [10 * PAGE, 2 * PAGE], [0, 1], ["x", "y"])
    sel._store[0].fill_(-7)
    plan = sel._plan_dev.clone()
    plan[0, 0] = 0  # row 0 reuses
    select_top_pages_(torch.randn(2, 2, 10, device=DEVICE), sel._store[0], plan, sel.keep)
    assert (sel._store[0] == -7).all()
    plan[0, 0] = 1
    select_top_pages_(torch.randn(2, 2, 10, device=DEVICE), sel._store[0], plan, sel.keep)
    assert (sel._store[0][0] != -7).all() and (sel._store[0][1:] == -7).all()  # row 1 fits: untouched
    with pytest.raises(ValueError, match="disagree"):
        select_top_pages_(torch.randn(2, 3, 10, device=DEVICE), sel._store[0], plan, sel.keep)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_reading_the_store_equals_the_explicit_lists(num_splits: int) -> None:
    rng = random.Random(num_splits)
    hkv, group, d, budget = 2, 3, 32, 4 * PAGE
    seq_lens = [11 * PAGE + 3, 2 * PAGE + 1, 7 * PAGE]  # row 1 fits the budget
    sel = _selector(hkv, budget, 3, 3)
    _plan(sel, seq_lens, [1, 2, 0], ["r0", "r1", "r2"])
    scores = torch.randn((3, hkv, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    stored = sel.update(0, 3, lambda: scores, select_top_pages_)
    lists = sel.select(0, 3, lambda: scores)  # reuse of the same selection, spelled out
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
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    listed = {(b, h): lists[0][b, h, : int(lists[1][b, h])].tolist() for b in range(3) for h in range(hkv)}
    expected = ref.sparse_decode_ref(q, k_cache, v_cache, seq_lens, tables, d**-0.5, page_lists=listed)
    assert torch.allclose(got, expected.to(got.dtype), atol=1e-4, rtol=1e-4)
    dense = sparse_decode(*args, num_splits=num_splits)
    assert not torch.allclose(got[0], dense[0], atol=1e-3)  # negative: row 0 really reads fewer pages
    assert torch.allclose(got[1], dense[1], atol=1e-5)  # row 1 fits: every page
