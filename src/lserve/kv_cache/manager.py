"""Per-request page tables over a page pool.

Today there is one pool, holding every KV head of every layer. The streaming-heads issue adds a
second pool (a ring of sink + local pages per request) beside this one; page tables are kept per
pool so that neither has to change shape for the other.
"""

from __future__ import annotations

from lserve.kv_cache.page_pool import PagePool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Grows and frees the page table of each request (pure CPU bookkeeping)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.page_tables: dict[str, list[int]] = {}

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
        table = self.page_tables.setdefault(request_id, [])
        table.extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        """Return every page of the request to the pool (finished, failed, aborted or preempted)."""
        pages = self.page_tables.pop(request_id, None)
        if pages:
            self.pool.free(pages)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owned = [p for table in self.page_tables.values() for p in table]
        assert len(owned) == len(set(owned)), "a page is owned by two requests"
        assert len(owned) == self.pool.num_used_pages, "used pages and page tables disagree"
