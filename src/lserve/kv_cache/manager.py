"""Per-request page tables over the paged pool, and a seat per running request.

A request that holds pages also holds a seat (0 .. num_seats - 1). The seat names its fixed block
of ring pages (streaming heads) and its rows in per-request device buffers (page selections), so
those need no allocation of their own; `max_num_seqs` seats are enough because only running
requests hold pages.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lserve.kv_cache.page_pool import PagePool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SeatPageRows:
    """Every seat's page ids as rows of one int32 array, kept in step with the page tables.

    A step's page table is then a slice of rows (`rows(seats, width)`), not a conversion of
    Python lists: at 256K tokens a table holds 4,096 pages per sequence, and converting those
    lists every decode step cost more host time than the rest of the step. Entries past a
    seat's pages are 0. Grows on demand (rows: seats used so far; columns: the longest table).
    """

    def __init__(self) -> None:
        self._rows = np.zeros((0, 0), dtype=np.int32)
        self._count: dict[int, int] = {}

    def append(self, seat: int, start: int, pages: Sequence[int]) -> None:
        end = start + len(pages)
        rows, cols = self._rows.shape
        if seat >= rows or end > cols:  # grow geometrically, only along the dimension that is short
            new_rows = rows if seat < rows else max(seat + 1, 2 * rows)
            new_cols = cols if end <= cols else max(end, 2 * cols)
            grown = np.zeros((new_rows, new_cols), dtype=np.int32)
            grown[:rows, :cols] = self._rows
            self._rows = grown
        self._rows[seat, start:end] = pages
        self._count[seat] = end

    def clear(self, seat: int) -> None:
        count = self._count.pop(seat, 0)
        if count:
            self._rows[seat, :count] = 0

    def rows(self, seats: Sequence[int], width: int) -> np.ndarray:
        """(len(seats), width) int32: the first `width` page ids of each seat, 0-padded."""
        out = np.zeros((len(seats), width), dtype=np.int32)
        have = min(width, self._rows.shape[1])
        if have and len(seats):
            out[:, :have] = self._rows[np.asarray(seats, dtype=np.int64), :have]
        return out


@dataclass(frozen=True)
class ForkCopy:
    """The device copies that give a forked sequence its own state: the pages it cannot share
    (a partly filled last page: its next tokens go there), in the paged pool and in the ring and
    window pools (`RingPages.fork`)."""

    page_pairs: tuple[tuple[int, int], ...]
    """(source page, new page) of the paged pool."""
    src_seat: int
    dst_seat: int
    num_tokens: int
    """The source's tokens the fork takes."""


TokenRange = Callable[[int, int], list[int]]
"""A request's token ids start..stop-1 (`Request.token_ids`)."""


def page_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The prefix cache's name for a full page: its tokens and, through `parent` (the previous
    page's key, b"" for the first), every token before them."""
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def extend_page_keys(keys: list[bytes], token_ids: TokenRange, num_pages: int, page_size: int) -> None:
    """Append the keys of a request's full pages up to `num_pages` to `keys` (its keys so far:
    a request's tokens never change, so each page is hashed once)."""
    for i in range(len(keys), num_pages):
        keys.append(page_key(keys[-1] if keys else b"", token_ids(i * page_size, (i + 1) * page_size)))


class KVCacheManager:
    """Grows and frees the page table of each request (pure CPU bookkeeping), and with
    `enable_caching` keeps full pages findable by their content for later requests."""

    def __init__(self, num_pages: int, page_size: int, num_seats: int | None = None,
                 enable_caching: bool = False) -> None:
        self.page_size = page_size
        self.enable_caching = enable_caching
        self._registered: dict[str, int] = {}
        """Per request: how many of its first pages are tagged for the prefix cache."""
        self.pool = PagePool(num_pages)
        self.page_tables: dict[str, list[int]] = {}
        self.num_seats = num_seats if num_seats is not None else num_pages
        self.seats: dict[str, int] = {}
        self._free_seats = list(range(self.num_seats - 1, -1, -1))

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of pages in use (vLLM's kv_cache_usage_perc)."""
        return self.pool.num_used_pages / self.pool.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.page_size)

    def num_new_pages(self, request_id: str, num_tokens: int) -> int:
        """Pages to add so that the request can hold `num_tokens` tokens."""
        have = len(self.page_tables.get(request_id, ()))
        return max(0, self.pages_for(num_tokens) - have)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens`; False (and no change) if the pool is short."""
        need = self.num_new_pages(request_id, num_tokens)
        if need > self.pool.num_free_pages:
            return False
        if request_id not in self.seats:
            if not self._free_seats:
                return False
            self._seat_with(request_id, [])
        table = self.page_tables[request_id]
        if need:
            new = self.pool.allocate(need)
            table.extend(new)
        return True

    def fork(self, src_id: str, dst_id: str, num_tokens: int) -> ForkCopy | None:
        """Give `dst_id` the KV of the first `num_tokens` tokens of `src_id`: the full pages
        shared (one more reference each), a partly filled last page copied into a new page, a
        seat of its own; None (and no change) when no seat or page is free. The caller copies the
        `ForkCopy` on the device before `dst_id` runs."""
        src = self.page_tables[src_id]
        full, partial = divmod(num_tokens, self.page_size)
        assert dst_id not in self.page_tables and full + (partial > 0) <= len(src)
        if not self._free_seats or self.pool.num_free_pages < (partial > 0):
            return None
        shared = src[:full]
        self.pool.share(shared)
        table = list(shared)
        pairs: tuple[tuple[int, int], ...] = ()
        if partial:
            table += self.pool.allocate(1)
            pairs = ((src[full], table[-1]),)
        seat = self._seat_with(dst_id, table)
        self._registered[dst_id] = min(self._registered.get(src_id, 0), full)
        return ForkCopy(pairs, self.seats[src_id], seat, num_tokens)

    def _seat_with(self, request_id: str, table: list[int]) -> int:
        """Give a request without pages a free seat and `table` as its pages; returns the seat."""
        seat = self.seats[request_id] = self._free_seats.pop()
        self.page_tables[request_id] = table
        return seat

    def cached_prefix(self, request_id: str, keys: Sequence[bytes]) -> int:
        """For a request holding no pages: share the longest run of cached pages whose keys
        start `keys` (its first full pages' keys; the caller leaves out the page of its last
        known token, which is always computed, to sample from), with a seat; returns the tokens
        they hold (0: none, and no change)."""
        assert request_id not in self.page_tables
        pages: list[int] = []
        for key in keys:
            page = self.pool.lookup(key)
            if page is None:
                break
            pages.append(page)
        if not pages or not self._free_seats:
            return 0
        self.pool.share(pages)
        self._seat_with(request_id, pages)
        self._registered[request_id] = len(pages)
        return len(pages) * self.page_size

    def register(self, request_id: str, keys: Sequence[bytes], num_pages: int) -> None:
        """Tag the request's first `num_pages` pages (full, computed) with their `keys` for the
        prefix cache; pages tagged earlier are skipped."""
        table = self.page_tables.get(request_id)
        if not self.enable_caching or table is None:
            return
        done, end = self._registered.get(request_id, 0), min(num_pages, len(table), len(keys))
        for i in range(done, end):
            self.pool.tag(table[i], keys[i])
        self._registered[request_id] = max(done, end)

    def free(self, request_id: str) -> None:
        """Return every page and the seat of the request (finished, failed, aborted or preempted);
        a shared page returns to the pool with its last holder."""
        pages = self.page_tables.pop(request_id, None)
        self._registered.pop(request_id, None)
        if pages:
            self.pool.free(pages)
        seat = self.seats.pop(request_id, None)
        if seat is not None:
            self._free_seats.append(seat)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owned = Counter(p for table in self.page_tables.values() for p in table)
        assert all(self.pool.refs(p) == n for p, n in owned.items()), "reference counts and page tables disagree"
        assert len(owned) == self.pool.num_used_pages, "used pages and page tables disagree"
        for table in self.page_tables.values():
            assert len(table) == len(set(table)), "a page appears twice in one table"
        assert set(self.seats) == set(self.page_tables), "seats and page tables disagree"
        assert len(set(self.seats.values())) == len(self.seats), "a seat is held twice"
        assert len(self.seats) + len(self._free_seats) == self.num_seats, "a seat was lost"
