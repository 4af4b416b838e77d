"""Per-request page tables over the paged pool, and a seat per running request.

A request that holds pages also holds a seat (0 .. num_seats - 1). The seat names its fixed block
of ring pages (streaming heads) and its rows in per-request device buffers (page selections), so
those need no allocation of their own; `max_num_seqs` seats are enough because only running
requests hold pages.
"""

from __future__ import annotations

from lserve.kv_cache.page_pool import PagePool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Grows and frees the page table of each request (pure CPU bookkeeping)."""

    def __init__(self, num_pages: int, page_size: int, num_seats: int | None = None) -> None:
        self.page_size = page_size
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
            self.seats[request_id] = self._free_seats.pop()
        table = self.page_tables.setdefault(request_id, [])
        table.extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        """Return every page and the seat of the request (finished, failed, aborted or preempted)."""
        pages = self.page_tables.pop(request_id, None)
        if pages:
            self.pool.free(pages)
        seat = self.seats.pop(request_id, None)
        if seat is not None:
            self._free_seats.append(seat)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owned = [p for table in self.page_tables.values() for p in table]
        assert len(owned) == len(set(owned)), "a page is owned by two requests"
        assert len(owned) == self.pool.num_used_pages, "used pages and page tables disagree"
        assert set(self.seats) == set(self.page_tables), "seats and page tables disagree"
        assert len(set(self.seats.values())) == len(self.seats), "a seat is held twice"
        assert len(self.seats) + len(self._free_seats) == self.num_seats, "a seat was lost"
