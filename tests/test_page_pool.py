"""PagePool and KVCacheManager: pure CPU bookkeeping of KV pages."""

from __future__ import annotations

import pytest

from lserve.kv_cache.manager import KVCacheManager, cdiv
from lserve.kv_cache.page_pool import PagePool

# ---- PagePool ---------------------------------------------------------------------------------


def test_pool_needs_a_page():
    with pytest.raises(ValueError):
        PagePool(0)


def test_pool_allocate_and_free():
    pool = PagePool(8)
    pool.check_invariants()
    assert pool.num_free_pages == 8 and pool.num_used_pages == 0

    a = pool.allocate(3)
    pool.check_invariants()
    b = pool.allocate(5)
    pool.check_invariants()
    assert len(a) == 3 and len(b) == 5
    assert sorted(a + b) == list(range(8)), "every page handed out once"
    assert pool.num_free_pages == 0 and pool.num_used_pages == 8

    pool.free(a)
    pool.check_invariants()
    assert pool.num_free_pages == 3 and pool.num_used_pages == 5
    c = pool.allocate(3)
    pool.check_invariants()
    assert sorted(c) == sorted(a), "freed pages are reused"

    pool.free(b)
    pool.free(c)
    pool.check_invariants()
    assert pool.num_free_pages == 8 and pool.num_used_pages == 0


def test_pool_allocate_zero_and_too_many():
    pool = PagePool(4)
    assert pool.allocate(0) == []
    pool.allocate(3)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.check_invariants()
    assert pool.num_free_pages == 1, "a failed allocation takes nothing"


def test_pool_double_free_raises():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.free(pages)
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(pages)
    pool.check_invariants()
    assert pool.num_free_pages == 4


def test_pool_free_of_never_allocated_page_raises():
    pool = PagePool(4)
    with pytest.raises(RuntimeError, match="twice"):
        pool.free([2])
    pool.check_invariants()
    assert pool.num_free_pages == 4


def test_pool_invariants_detect_corruption():
    pool = PagePool(4)
    pool.allocate(2)
    pool._free.append(pool._free[0])  # a page listed free twice
    with pytest.raises(AssertionError):
        pool.check_invariants()


# ---- KVCacheManager ---------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "want"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 16, 1), (17, 16, 2)])
def test_cdiv(a, b, want):
    assert cdiv(a, b) == want


def test_manager_grows_tables_by_cdiv():
    kv = KVCacheManager(num_pages=10, page_size=4)
    assert kv.num_pages == 10
    for tokens in (1, 2, 4, 5, 8, 9, 13):
        assert kv.allocate("a", tokens)
        kv.check_invariants()
        assert len(kv.page_tables["a"]) == cdiv(tokens, 4) == kv.pages_for(tokens)
    assert kv.num_free_pages == 10 - 4
    # Asking for fewer tokens than already held changes nothing.
    table = list(kv.page_tables["a"])
    assert kv.allocate("a", 3)
    assert kv.page_tables["a"] == table
    assert kv.num_new_pages("a", 16) == 0
    assert kv.num_new_pages("a", 17) == 1
    assert kv.num_new_pages("b", 17) == 5
    # Growing keeps the old pages in order.
    assert kv.allocate("a", 20)
    assert kv.page_tables["a"][:4] == table and len(kv.page_tables["a"]) == 5
    kv.check_invariants()


def test_manager_tables_are_disjoint():
    kv = KVCacheManager(num_pages=12, page_size=2)
    assert kv.allocate("a", 5)
    assert kv.allocate("b", 7)
    assert kv.allocate("c", 1)
    kv.check_invariants()
    owned = kv.page_tables["a"] + kv.page_tables["b"] + kv.page_tables["c"]
    assert len(owned) == len(set(owned)) == 3 + 4 + 1


def test_manager_allocate_short_changes_nothing():
    kv = KVCacheManager(num_pages=4, page_size=4)
    assert kv.allocate("a", 8)  # 2 pages
    before_tables = {k: list(v) for k, v in kv.page_tables.items()}
    before_free = kv.num_free_pages

    assert not kv.allocate("b", 12)  # needs 3, 2 free
    assert not kv.allocate("a", 17)  # needs 3 more, 2 free
    kv.check_invariants()
    assert kv.page_tables == before_tables
    assert "b" not in kv.page_tables
    assert kv.num_free_pages == before_free

    assert kv.allocate("b", 8)  # exactly the 2 left
    assert kv.num_free_pages == 0
    assert not kv.allocate("c", 1)
    assert "c" not in kv.page_tables
    kv.check_invariants()


def test_manager_free_returns_all_pages():
    kv = KVCacheManager(num_pages=8, page_size=3)
    assert kv.allocate("a", 10)  # 4 pages
    assert kv.allocate("b", 6)  # 2 pages
    kv.free("a")
    kv.check_invariants()
    assert "a" not in kv.page_tables
    assert kv.num_free_pages == 6
    kv.free("a")  # freeing again (or an unknown id) is a no-op
    kv.free("zzz")
    kv.check_invariants()
    assert kv.num_free_pages == 6
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_pages == 8 and kv.page_tables == {}


def test_manager_usage_fraction():
    kv = KVCacheManager(num_pages=8, page_size=4)
    assert kv.usage == 0.0
    kv.allocate("a", 4)
    assert kv.usage == pytest.approx(1 / 8)
    kv.allocate("b", 12)
    assert kv.usage == pytest.approx(4 / 8)
    kv.allocate("c", 16)
    assert kv.usage == pytest.approx(1.0)
    kv.free("b")
    assert kv.usage == pytest.approx(5 / 8)
    kv.free("a")
    kv.free("c")
    assert kv.usage == 0.0
    kv.check_invariants()


def test_manager_invariants_detect_shared_page():
    kv = KVCacheManager(num_pages=4, page_size=4)
    kv.allocate("a", 4)
    kv.page_tables["b"] = list(kv.page_tables["a"])
    with pytest.raises(AssertionError):
        kv.check_invariants()


def test_pool_hands_out_the_pages_freed_last_first():
    """A stack, so that a CPU pool's resident memory stays at the working set (never-used pages
    are untouched memory): after a request ends, the next one reuses its pages."""
    pool = PagePool(10)
    a = pool.allocate(3)
    assert a == [0, 1, 2]  # fresh pages in ascending order
    b = pool.allocate(2)
    pool.free(a)
    assert pool.allocate(3) == a  # the freed pages, in their order, before pages 5..9
    pool.free(b)
    assert pool.allocate(4) == [*b, 5, 6]
    pool.check_invariants()
