"""Ring and window pool pages on demand: each running sequence holds the pages of its sink and of
its current window, taken from one free list as the window moves and returned behind it.

Streaming heads and sliding-window layers read a constant number of tokens per query, so a
sequence needs only the pages those tokens lie in (`RingGeometry.live_pages`). Reserving a block
per seat for the largest prefill chunk (the window plus `max_num_batched_tokens`) would cost
`max_num_seqs` chunks of memory for what one step at most writes; here a chunk takes its pages
for the step and returns those that left the window right after it is planned. The pool is sized
by `RingGeometry.pool_pages`, the most that running sequences can hold at once, so taking a page
never fails for a request the scheduler admitted.

Pages go back when the step that last needs them is planned, before it runs: the device runs the
steps in order, so a page handed to another sequence in a later step is written only after the
step that read it finished.

A forked sequence shares its source's full pages (a reference count per page, as the paged pool
does): only the partly filled last page, which its own tokens go on to fill, is copied. A shared
prefix keeps its prefill window until its last sequence forked (each sequence's first row, its
last prompt token, is a prefill row over it); at most one computed prefix waits at a time, as
the queue admits a prefix's sequences before anything behind them, so it takes the pool's one
prefill window (`RingGeometry.pool_pages`).

Pure host bookkeeping, like the paged pool's page tables (`kv_cache.manager`); the runner owns one
per pool and builds the step's tables from it. Tensor-parallel ranks each keep their own and make
the same choices, as they see the same steps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lserve.kv_cache.layout import KVCacheTensors, RingGeometry
from lserve.kv_cache.page_pool import PagePool

SPARE_PAGES = 2
"""Pages a ring or window pool's tensors hold past those handed out: the scratch page, then the
null page (`kv_cache.layout`)."""


def pool_tensor_pages(num_pages: int) -> int:
    """Pages of the tensors of a pool that hands out `num_pages`."""
    return num_pages + SPARE_PAGES


class _SeatPages:
    """What one seat holds: its sink pages and one run of window pages, `base` .. `top` - 1."""

    __slots__ = ("pages", "base", "top")

    def __init__(self) -> None:
        self.pages: dict[int, int] = {}
        """logical page -> pool page"""
        self.base = 0
        self.top = 0


class RingPages:
    """The pages of one ring (or window) pool per seat: logical page -> pool page for the pages a
    seat holds; the tables name the null page for every other logical page. Host work per step
    is proportional to the pages that change, not to the context."""

    def __init__(self, geometry: RingGeometry, tensors: KVCacheTensors) -> None:
        self.geometry = geometry
        self.num_pages = tensors.num_pages - SPARE_PAGES
        """Pages handed out: ids 0 .. num_pages - 1."""
        if self.num_pages < 1:
            raise ValueError(f"a ring pool needs at least one page past its {SPARE_PAGES} spare ones")
        self.scratch_page = self.num_pages
        """Written by the padded rows of captured decode graphs; no sequence holds it."""
        self.null_page = self.num_pages + 1
        """Zeros; what the tables name for pages a sequence does not hold."""
        tensors.zero_pages([self.null_page])
        self._pool = PagePool(self.num_pages)
        """Free list (a stack: the pages freed last go first) and reference counts (forks share pages)."""
        self._seats: dict[int, _SeatPages] = {}
        self._rows = np.full((0, 0), self.null_page, dtype=np.int32)

    @property
    def num_free_pages(self) -> int:
        return self._pool.num_free_pages

    def held(self, seat: int) -> dict[int, int]:
        """The seat's pages (logical -> pool page); do not modify."""
        state = self._seats.get(seat)
        return state.pages if state is not None else {}

    def prepare(self, seat: int, first_pos: int, seq_len: int, prefill: bool) -> None:
        """Give the seat every page its prefill (or decode) row of a step reads or writes (its
        first new token at `first_pos`, `seq_len` tokens after it) and return those before its window."""
        sink_end, lo, hi = self.geometry.live_pages(first_pos, seq_len, prefill)
        state = self._seats.setdefault(seat, _SeatPages())
        if lo < state.base and any(sink_end <= p for p in state.pages):
            raise RuntimeError(f"ring pages of seat {seat} from logical page {lo} were returned before a row that "
                               f"reads them (held from {state.base})")
        self._drop_before(seat, state, lo)
        wanted = [p for p in range(sink_end) if p not in state.pages]
        start = max(lo, state.top)
        wanted += range(start, hi)
        if len(wanted) > self.num_free_pages:
            raise RuntimeError(f"the ring pool ran out of pages: seat {seat} needs {len(wanted)} more, "
                               f"{self.num_free_pages} of {self.num_pages} are free (its size is planned too small)")
        state.top = max(state.top, hi)
        self._grow(seat, hi)
        for logical, page in zip(wanted, self._pool.allocate(len(wanted))):
            state.pages[logical] = page
            self._rows[seat, logical] = page

    def trim(self, seat: int, seq_len: int, prefill_next: bool) -> None:
        """Return the seat's pages that the window of its next row (a prefill row, or a decode
        row) no longer reaches."""
        state = self._seats.get(seat)
        if state is not None:
            self._drop_before(seat, state, self.geometry.live_pages(seq_len, seq_len + 1, prefill_next)[1])

    def release(self, seat: int) -> None:
        """Return every page of the seat (its request ended or was preempted)."""
        state = self._seats.pop(seat, None)
        if state is not None and state.pages:
            self._pool.free(list(state.pages.values()))
            self._rows[seat, list(state.pages)] = self.null_page

    def fork(self, src_seat: int, dst_seat: int, num_tokens: int) -> tuple[list[int], list[int]]:
        """Give `dst_seat` the first `num_tokens` tokens of `src_seat`'s pages: its full pages
        shared, the partly filled last page (if held) in a page of its own; returns (source pages,
        destination pages) for the caller to copy on the device."""
        self.release(dst_seat)
        src = self._seats.get(src_seat, _SeatPages())
        full = num_tokens // self.geometry.page_size
        copied = [p for p in src.pages if p >= full]
        if len(copied) > self.num_free_pages:
            raise RuntimeError(f"the ring pool ran out of pages for a fork: {len(copied)} needed, "
                               f"{self.num_free_pages} free")
        dst = self._seats[dst_seat] = _SeatPages()
        dst.base, dst.top = src.base, src.top
        self._grow(dst_seat, src.top)
        shared = [page for logical, page in src.pages.items() if logical < full]
        self._pool.share(shared)
        new = iter(self._pool.allocate(len(copied)))
        for logical, page in src.pages.items():
            dst.pages[logical] = page if logical < full else next(new)
            self._rows[dst_seat, logical] = dst.pages[logical]
        return [src.pages[p] for p in copied], [dst.pages[p] for p in copied]

    def rows(self, seats: list[int], width: int) -> np.ndarray:
        """(len(seats), width) int32: each seat's pool page per logical page (the null page where it
        holds none)."""
        out = np.full((len(seats), width), self.null_page, dtype=np.int32)
        have = min(width, self._rows.shape[1])
        if have and seats:
            known = [i for i, s in enumerate(seats) if s < self._rows.shape[0]]
            out[known, :have] = self._rows[np.asarray([seats[i] for i in known], dtype=np.int64), :have]
        return out

    def _drop_before(self, seat: int, state: _SeatPages, lo: int) -> None:
        """Return the seat's window pages before logical page `lo` (its sink pages stay)."""
        first = max(state.base, self.geometry.sink_pages)
        gone = [p for p in range(first, min(lo, state.top)) if p in state.pages]
        self._pool.free([state.pages.pop(logical) for logical in gone])
        if gone:
            self._rows[seat, gone] = self.null_page
        state.base = max(state.base, lo)

    def _grow(self, seat: int, width: int) -> None:
        rows, cols = self._rows.shape
        if seat < rows and width <= cols:
            return
        new_rows = rows if seat < rows else max(seat + 1, 2 * rows)
        new_cols = cols if width <= cols else max(width, 2 * cols)
        grown = np.full((new_rows, new_cols), self.null_page, dtype=np.int32)
        grown[:rows, :cols] = self._rows
        self._rows = grown

    def check_invariants(self) -> None:
        self._pool.check_invariants()
        held = Counter(p for state in self._seats.values() for p in state.pages.values())
        assert all(self._pool.refs(p) == n for p, n in held.items()), "reference counts and held pages disagree"
        assert len(held) == self._pool.num_used_pages, "a ring page was lost"
        sink = self.geometry.sink_pages
        for seat, state in self._seats.items():
            window = sorted(p for p in state.pages if p >= sink)
            assert window == list(range(window[0], window[-1] + 1)) if window else True, "window pages are not one run"
            assert all(state.base <= p < state.top for p in window), "a window page lies outside base .. top"
            for logical, page in state.pages.items():
                assert self._rows[seat, logical] == page, "the table and the held pages disagree"
