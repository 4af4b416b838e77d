"""A pool of fixed-size KV pages: a free list and ownership, nothing about tensors."""

from __future__ import annotations


class PagePool:
    """Hands out page ids 0..num_pages-1; each page is owned by at most one request.

    The free list is a stack: the pages freed last are handed out first, and never-used pages
    (in ascending order) only when no freed page is left. Pages of a CPU pool become resident
    memory when first written, so a server whose load never fills the pool keeps only its
    working set resident, not the whole pool.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # the top of the stack is the end
        self._is_free = [True] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` pages; the caller checks `num_free_pages` first (raises if there are too few)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages with {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise RuntimeError(f"page {p} is not in this pool")
            if self._is_free[p]:
                raise RuntimeError(f"page {p} freed twice")
            self._is_free[p] = True
        self._free.extend(reversed(pages))  # the next allocation takes them back in the same order

    def check_invariants(self) -> None:
        assert len(set(self._free)) == len(self._free), "duplicate page in the free list"
        assert sum(self._is_free) == len(self._free), "free flags disagree with the free list"
        assert all(self._is_free[p] for p in self._free)
