"""A pool of fixed-size KV pages: a free list, reference counts and the prefix cache's tags,
nothing about tensors."""

from __future__ import annotations

from collections import OrderedDict


class PagePool:
    """Hands out page ids 0..num_pages-1, with a reference count per page: a page is allocated
    with one reference, `share` adds one (a forked sequence reading a prompt page it did not
    write), and it returns to the free list when its last reference is freed.

    The free list is a stack: the pages freed last are handed out first, and never-used pages
    (in ascending order) only when no freed page is left. Pages of a CPU pool become resident
    memory when first written, so a server whose load never fills the pool keeps only its
    working set resident, not the whole pool.

    Prefix caching tags a full page with the hash of its content (`tag`). A tagged page whose
    last reference is freed stays cached: it keeps its KV and can be found (`lookup`) and shared
    again, until an allocation finds the free list empty and evicts the least recently freed
    cached page (its tag is dropped).
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # the top of the stack is the end
        self._refs = [0] * num_pages
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Tagged pages without references, least recently freed first (evicted in this order)."""
        self._page_of: dict[bytes, int] = {}
        self._tag_of: dict[int, bytes] = {}
        self.num_evictions = 0

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: free ones and cached ones without references."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Cached pages that no request holds (evictable)."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take `n` pages, evicting cached ones (least recently freed first) when the free list
        runs out; the caller checks `num_free_pages` first (raises if there are too few)."""
        if n > self.num_free_pages:
            raise RuntimeError(f"asked for {n} pages with {self.num_free_pages} free")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._cached.popitem(last=False)
                del self._page_of[self._tag_of.pop(p)]
                self.num_evictions += 1
            self._refs[p] = 1
            pages.append(p)
        return pages

    def share(self, pages: list[int]) -> None:
        """One more reference to each of these pages (each in use, or cached)."""
        for p in pages:
            if not 0 <= p < self.num_pages or (self._refs[p] == 0 and p not in self._cached):
                raise RuntimeError(f"page {p} is not in use and cannot be shared")
            self._cached.pop(p, None)
            self._refs[p] += 1

    def tag(self, page: int, key: bytes) -> bool:
        """Mark an in-use full page as holding the content `key` names; False (no change) when
        another page already holds it or this page has a tag."""
        if key in self._page_of or page in self._tag_of:
            return False
        self._page_of[key] = page
        self._tag_of[page] = key
        return True

    def lookup(self, key: bytes) -> int | None:
        """The page tagged `key`, in use or cached, if any."""
        return self._page_of.get(key)

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
                if p in self._tag_of:
                    self._cached[p] = None  # kept for the prefix cache, most recently freed last
                else:
                    released.append(p)
        self._free.extend(reversed(released))  # the next allocation takes them back in the same order

    def check_invariants(self) -> None:
        assert len(set(self._free)) == len(self._free), "duplicate page in the free list"
        assert not set(self._free) & set(self._cached), "a page is both free and cached"
        assert sum(r == 0 for r in self._refs) == self.num_free_pages, "reference counts disagree with the free lists"
        assert all(self._refs[p] == 0 for p in self._free) and all(self._refs[p] == 0 for p in self._cached)
        assert all(p in self._tag_of for p in self._cached), "an untagged page is cached"
        assert all(self._page_of[k] == p for p, k in self._tag_of.items()), "tags disagree"
        assert not any(p in self._tag_of for p in self._free), "a free page keeps a tag"
