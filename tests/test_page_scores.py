"""Page scoring and selection (dynamic sparsity) against brute-force references."""

from __future__ import annotations

import random

import pytest
import torch

from lserve.ops import reference as ref
from lserve.ops.page_scores import page_scores, select_pages

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("page_size,logical", [(16, 16), (64, 16), (32, 8)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("aggregate", ["max", "sum"])
def test_page_scores_match_reference(page_size: int, logical: int, hq: int, hkv: int, aggregate: str) -> None:
    d = 32
    gen = torch.Generator().manual_seed(page_size + hq)
    rng = random.Random(page_size * hq)
    seq_lens = [rng.randint(1, 7 * page_size) for _ in range(3)] + [page_size * 3]
    num_pages = sum(-(-n // page_size) for n in seq_lens) + 4
    ids = list(range(num_pages))
    rng.shuffle(ids)
    tables = []
    for n in seq_lens:
        k = -(-n // page_size)
        tables.append(ids[:k])
        ids = ids[k:]
    rows = num_pages * page_size // logical
    k_min = torch.randn((rows, hkv, d), generator=gen)
    k_max = k_min + torch.rand((rows, hkv, d), generator=gen)
    # stale statistics past each sequence's end must not count: make them huge
    for n, table in zip(seq_lens, tables):
        first_unused = -(-n // logical) * logical
        for pos in range(first_unused, len(table) * page_size, logical):
            k_max[table[pos // page_size] * (page_size // logical) + (pos % page_size) // logical] = 1e4
    q = torch.randn((len(seq_lens), hq, d), generator=gen)
    width = max(len(t) for t in tables)
    table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
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


def test_select_pages_topk_plus_newest_and_all_when_it_fits() -> None:
    scores = torch.tensor([[[5.0, 1.0, 9.0, 3.0, 7.0, 0.5, float("-inf")]],
                           [[1.0, 2.0, 3.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")]]])
    seq_lens = torch.tensor([6 * 16 - 3, 3 * 16])  # 6 pages and 3 pages of 16 tokens
    pages, lengths = select_pages(scores, seq_lens, page_size=16, token_budget=4 * 16)
    assert lengths.tolist() == [[4], [3]]
    assert pages[0, 0].tolist() == [0, 2, 4, 5]  # top-3 older pages (9, 7, 5) + the newest (5)
    assert pages[1, 0, :3].tolist() == [0, 1, 2]  # within the budget: every page, no selection
    # brute force on random scores
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn((3, 2, 20), generator=gen)
    lens = torch.tensor([20 * 16, 11 * 16 + 1, 5 * 16])
    for b in range(3):
        rand[b, :, -(-int(lens[b]) // 16):] = float("-inf")
    pages, lengths = select_pages(rand, lens, 16, 6 * 16)
    for b in range(3):
        n = -(-int(lens[b]) // 16)
        for h in range(2):
            got = pages[b, h, : lengths[b, h]].tolist()
            if n <= 6:
                assert got == list(range(n))
            else:
                older = sorted(range(n - 1), key=lambda p: -float(rand[b, h, p]))[:5]
                assert got == sorted(older + [n - 1])
