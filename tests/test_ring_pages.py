"""Ring and window pool pages on demand (`kv_cache.ring_pages`): what a sequence holds as its
window moves, forks sharing full pages, and pages coming back."""

from __future__ import annotations

import pytest
import torch

from lserve.kv_cache.layout import KVCacheTensors, KVShape, RingGeometry
from lserve.kv_cache.ring_pages import RingPages, pool_tensor_pages

GEO = RingGeometry(page_size=4, sink_tokens=4, local_tokens=6, prefill_local_tokens=10)


def _pages(num_pages: int) -> tuple[RingPages, KVCacheTensors]:
    tensors = KVCacheTensors(KVShape(1, 1, 2, 4, torch.float32), pool_tensor_pages(num_pages), torch.device("cpu"))
    for t in (*tensors.k, *tensors.v):
        t.fill_(float("nan"))
    return RingPages(GEO, tensors), tensors


def test_a_sequence_holds_its_sink_and_window_only() -> None:
    pages, tensors = _pages(20)
    assert torch.equal(tensors.k[0][pages.null_page], torch.zeros(4, 1, 2))  # the null page is zeros
    pages.prepare(0, 0, 23, prefill=True)  # a 23-token chunk: every page it writes
    assert sorted(pages.held(0)) == list(range(6))
    pages.trim(0, 23, prefill_next=False)  # the next row decodes: sink page + the pages of tokens 17..22
    assert sorted(pages.held(0)) == [0, 4, 5]
    for pos in range(23, 40):  # decode: the window moves, the sink stays
        pages.prepare(0, pos, pos + 1, prefill=False)
        pages.trim(0, pos + 1, prefill_next=False)
        lo = (pos + 1 - GEO.local_tokens + 1) // 4
        assert sorted(pages.held(0)) == [0, *range(lo, -(-(pos + 1) // 4))]
        assert len(pages.held(0)) <= GEO.pages_per_seq
        pages.check_invariants()
    row = pages.rows([0], 12)[0]
    assert row[1] == row[2] == pages.null_page and row[0] == pages.held(0)[0]
    pages.release(0)
    assert pages.num_free_pages == pages.num_pages
    pages.check_invariants()


def test_a_fork_shares_full_pages_and_copies_the_partial_one() -> None:
    pages, _ = _pages(20)
    pages.prepare(0, 0, 18, prefill=True)  # a prefix of 18 tokens: pages 0..4, the last partly filled
    pages.trim(0, 18, prefill_next=True)  # a prefix keeps its prefill window for its forks
    src, dst = pages.fork(0, 1, 18)
    assert src == [pages.held(0)[4]] and dst == [pages.held(1)[4]] and src != dst  # only the partial page copied
    assert all(pages.held(1)[p] == pages.held(0)[p] for p in pages.held(0) if p < 4)
    pages.fork(0, 2, 18)
    pages.release(0)  # the prefix goes once its forks are made: the shared pages stay
    pages.check_invariants()
    pages.prepare(1, 17, 19, prefill=True)  # each fork's first row reads the prefill window
    pages.prepare(2, 17, 19, prefill=True)
    for seat in (1, 2):
        pages.trim(seat, 19, prefill_next=False)
    pages.check_invariants()
    pages.release(1)
    pages.release(2)
    assert pages.num_free_pages == pages.num_pages
    pages.check_invariants()


def test_a_row_whose_pages_were_returned_is_an_error_not_a_silent_null_read() -> None:
    pages, _ = _pages(20)
    pages.prepare(0, 0, 30, prefill=True)
    pages.trim(0, 30, prefill_next=False)  # kept only the decode window
    with pytest.raises(RuntimeError, match="returned before a row that reads them"):
        pages.prepare(0, 30, 31, prefill=True)  # a prefill row needs the wider window


def test_running_out_is_a_clear_error() -> None:
    pages, _ = _pages(3)
    with pytest.raises(RuntimeError, match="ran out of pages"):
        pages.prepare(0, 0, 17, prefill=True)
