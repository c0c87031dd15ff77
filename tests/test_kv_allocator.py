import pytest

from tropical_jax.kv.allocator import BlockTable, OutOfPages, PageAllocator


def test_allocate_free_roundtrip_and_counts():
    a = PageAllocator(num_pages=8, page_size=16)
    pages = a.allocate(3)
    assert pages == [0, 1, 2]
    assert (a.num_used, a.num_free) == (3, 5)
    a.free(pages)
    assert (a.num_used, a.num_free) == (0, 8)


def test_all_or_nothing_allocation():
    a = PageAllocator(num_pages=4, page_size=8)
    a.allocate(3)
    with pytest.raises(OutOfPages, match="need 2 pages, 1 of 4 free"):
        a.allocate(2)
    assert a.num_free == 1


def test_double_free_raises_and_changes_nothing():
    a = PageAllocator(num_pages=4, page_size=8)
    p = a.allocate(2)
    a.free(p[:1])
    with pytest.raises(ValueError, match="double free of page 0"):
        a.free(p)  # page 0 again, page 1 legitimately
    assert a.num_free == 3 and a.ref_count(p[1]) == 1


@pytest.mark.parametrize("bad", [[0, 8], [1, -1], [2, 0, 2]])
def test_bad_free_of_several_pages_raises_and_changes_nothing(bad):
    a = PageAllocator(num_pages=8, page_size=8)
    a.allocate(3)
    with pytest.raises(ValueError, match="out of range|double free"):
        a.free(bad)
    assert a.num_free == 5 and [a.ref_count(p) for p in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    a.free([2, 0, 1])
    assert a.num_free == 8 and a.allocate(8) == [1, 0, 2, 3, 4, 5, 6, 7]  # freed pages first, last freed first


def test_shared_pages_free_only_at_zero():
    a = PageAllocator(num_pages=4, page_size=8)
    p = a.allocate(1)
    a.incref(p)
    a.free(p)
    assert a.num_free == 3
    a.free(p)
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.incref(p)


def test_block_table_grows_by_pages_and_fails_atomically():
    a = PageAllocator(num_pages=3, page_size=4)
    t = BlockTable()
    assert t.ensure(a, 5) and len(t.pages) == 2
    assert t.ensure(a, 8) and len(t.pages) == 2  # still fits in 2 pages
    assert not t.ensure(a, 13)  # needs 4 pages, only 3 exist
    assert len(t.pages) == 2 and a.num_free == 1
    t.release(a)
    assert a.num_free == 3 and t.pages == []


def test_release_of_a_table_with_a_shared_page_keeps_that_page():
    a = PageAllocator(num_pages=4, page_size=4)
    t, other = BlockTable(), BlockTable()
    assert t.ensure(a, 8) and other.ensure(a, 4)
    a.incref(t.pages[:1])  # another sequence shares t's first page
    shared = t.pages[0]
    t.release(a)
    assert a.ref_count(shared) == 1 and a.num_free == 2
    a.free([shared])
    other.release(a)  # nothing shared any more: the unchecked path
    assert a.num_free == 4 and all(a.ref_count(p) == 0 for p in range(4))
    assert a.allocate(4) == [2, 0, 1, 3]  # last freed first: other's page, the shared one, t's second, the never used


@pytest.mark.parametrize("listing", ["freed_elsewhere", "released_twice", "listed_twice"])
def test_release_of_a_page_already_free_raises_and_changes_nothing(listing):
    # The unchecked release (nothing shared) still must never put a page on the free list twice:
    # the allocator would hand it to two sequences.
    a = PageAllocator(num_pages=6, page_size=4)
    t, other = BlockTable(), BlockTable()
    assert t.ensure(a, 12) and other.ensure(a, 4)
    if listing == "freed_elsewhere":
        a.free(t.pages[1:2])
        bad, pages = t.pages[1], t.pages
    elif listing == "released_twice":
        pages = list(t.pages)
        t.release(a)
        bad = pages[0]
    else:
        pages = t.pages + t.pages[:1]
        bad = pages[0]
    refs, free = [a.ref_count(p) for p in range(6)], a.num_free
    with pytest.raises(ValueError, match=f"double free of page {bad}"):
        a.free_own(pages)
    assert [a.ref_count(p) for p in range(6)] == refs and a.num_free == free
