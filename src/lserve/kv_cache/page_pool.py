"""A pool of fixed-size KV pages: a free list and ownership, nothing about tensors."""

from __future__ import annotations


class PagePool:
    """Hands out page ids 0..num_pages-1, with a reference count per page: a page is allocated
    with one reference, `share` adds one (a forked sequence reading a prompt page it did not
    write), and it returns to the free list when its last reference is freed.

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
        self._refs = [0] * num_pages

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
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each of these pages (each must be in use)."""
        for p in pages:
            if not 0 <= p < self.num_pages or self._refs[p] == 0:
                raise RuntimeError(f"page {p} is not in use and cannot be shared")
            self._refs[p] += 1

    def refs(self, page: int) -> int:
        return self._refs[page]

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; pages left without one return to the free list."""
        released = []
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise RuntimeError(f"page {p} is not in this pool")
            if self._refs[p] == 0:
                raise RuntimeError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                released.append(p)
        self._free.extend(reversed(released))  # the next allocation takes them back in the same order

    def check_invariants(self) -> None:
        assert len(set(self._free)) == len(self._free), "duplicate page in the free list"
        assert sum(r == 0 for r in self._refs) == len(self._free), "reference counts disagree with the free list"
        assert all(self._refs[p] == 0 for p in self._free)
