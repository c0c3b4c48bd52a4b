"""Page pool, prefix index, LRU eviction and per-group page tables (no scheduler involved)."""

from __future__ import annotations

import pytest

from serve.kv_pages import NULL_PAGE, KVCacheManager, PageGroup, PagePool, page_hash
from serve.request import MultiModalSpan, Request, SamplingParams


def compute(kv: KVCacheManager, request: Request, n: int, hit=None):
    """What the scheduler and runner do for one step of ``n`` tokens."""
    tables = kv.allocate_slots(request, n, hit)
    assert tables is not None
    request.num_computed_tokens += (hit.num_tokens if hit else 0) + n
    kv.cache_full_pages(request)
    return tables


def test_page_hash_depends_on_parent_tokens_and_extra_keys():
    a = page_hash(None, [1, 2, 3, 4])
    assert a == page_hash(None, [1, 2, 3, 4]) and len(a) == 32
    distinct = {
        a,
        page_hash(None, [1, 2, 4, 3]),
        page_hash(a, [1, 2, 3, 4]),
        page_hash(None, [1, 2, 3, 4], ["img:abc"]),
        page_hash(None, [1, 2, 3, 4], ["img:abd"]),
    }
    assert len(distinct) == 5


def test_pool_allocate_free_and_reference_counts():
    pool = PagePool(4, 8)
    pages = pool.allocate(3)
    assert len(set(pages)) == 3 and pool.num_free == 1 and pool.num_used == 3
    assert [pool.ref_count(p) for p in pages] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"allocate\(2\): only 1 of 4 pages are free"):
        pool.allocate(2)
    pool.free(pages)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        pool.free([pages[0]])
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(0, 8)
    with pytest.raises(ValueError, match="page_size"):
        PagePool(4, 0)


def test_unkeyed_pages_are_reused_before_cached_ones():
    pool = PagePool(4, 2)
    pages = pool.allocate(4)
    pool.cache(pages[0], b"k0")
    pool.cache(pages[1], b"k1")
    pool.free(pages)
    assert pool.num_free == 4 and pool.num_cached == 2
    assert sorted(pool.allocate(2)) == sorted(pages[2:])
    assert pool.lookup(b"k0") == pages[0] and pool.lookup(b"k1") == pages[1] and pool.num_evictions == 0


def test_lru_eviction_order_of_unreferenced_cached_pages():
    pool = PagePool(4, 2)
    pages = pool.allocate(4)
    for i, p in enumerate(pages):
        assert pool.cache(p, b"k%d" % i)
    pool.free([pages[2], pages[0], pages[3], pages[1]])
    assert pool.evictable_pages() == [pages[2], pages[0], pages[3], pages[1]]
    pool.acquire([pages[0]])  # a prefix hit takes it off the LRU list ...
    assert pool.ref_count(pages[0]) == 1 and pool.num_free == 3
    pool.free([pages[0]])  # ... and it comes back as the most recently used
    assert pool.evictable_pages() == [pages[2], pages[3], pages[1], pages[0]]
    assert pool.allocate(1) == [pages[2]]
    assert pool.lookup(b"k2") is None and pool.key(pages[2]) is None and pool.num_evictions == 1
    assert pool.allocate(2) == [pages[3], pages[1]]
    assert pool.lookup(b"k0") == pages[0] and pool.num_cached == 1
    with pytest.raises(ValueError, match="holds no prefix key"):
        pool.acquire([pages[3]])


def test_cache_keeps_the_first_page_for_a_key_and_reset_forgets_unreferenced():
    pool = PagePool(3, 2)
    a, b, c = pool.allocate(3)
    assert pool.cache(a, b"k") and not pool.cache(b, b"k")
    assert pool.key(b) is None and pool.lookup(b"k") == a
    assert pool.cache(a, b"k")  # idempotent
    with pytest.raises(ValueError, match="different prefix key"):
        pool.cache(a, b"other")
    pool.cache(c, b"kc")
    pool.free([a, b])
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(b"k") is None and pool.lookup(b"kc") == c and pool.num_free == 2


def test_longest_cached_prefix_is_found_and_shared_copy_free():
    G = 4
    kv = KVCacheManager(PagePool(16, G))
    a = Request("a", list(range(13)), SamplingParams(max_tokens=4))
    tables = compute(kv, a, 13)
    assert kv.pool.num_cached == 3
    b = Request("b", list(range(8)) + [99, 98, 97, 96, 95], SamplingParams(max_tokens=4))
    hit = kv.get_computed_pages(b)
    assert hit.num_tokens == 8 and hit.page_tables == (tuple(tables[0][:2]),)
    assert [kv.pool.ref_count(p) for p in tables[0][:2]] == [1, 1]  # looked up, not taken
    b_tables = compute(kv, b, 5, hit)
    assert b_tables[0][:2] == tables[0][:2] and len(set(b_tables[0][2:]) & set(tables[0])) == 0
    assert [kv.pool.ref_count(p) for p in tables[0][:2]] == [2, 2]
    assert kv.stats.hits == 8 and kv.stats.queries == 13 + 13
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free == 16
    # Freed tail first: a's last page is the first to go, the shared first page the last.
    assert kv.pool.evictable_pages()[-2:] == [tables[0][1], tables[0][0]]


def test_image_content_and_cache_salt_key_pages():
    G = 4
    kv = KVCacheManager(PagePool(32, G))
    prompt = list(range(17))
    span = lambda h: (MultiModalSpan(offset=9, length=4, content_hash=h),)  # noqa: E731 - pages 2 and 3
    compute(kv, Request("a", prompt, mm_spans=span("cat")), 17)
    assert kv.get_computed_pages(Request("b", prompt, mm_spans=span("cat"))).num_tokens == 16
    assert kv.get_computed_pages(Request("c", prompt, mm_spans=span("dog"))).num_tokens == 8
    assert kv.get_computed_pages(Request("d", prompt, mm_spans=span("cat"), cache_salt="tenant-2")).num_tokens == 0


def test_allocation_is_all_or_nothing_across_groups():
    G = 4
    glob, slid = PagePool(64, G), PagePool(2, G)
    kv = KVCacheManager([PageGroup(glob), PageGroup(slid, window=4)])
    r = Request("r", list(range(12)))
    assert kv.allocate_slots(r, 12) is None  # 3 sliding pages needed, 2 exist
    assert glob.num_free == 64 and slid.num_free == 2 and kv.num_held_pages(r) == (0, 0)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 1"):
        kv.allocate_slots(r, 0)


def test_cache_hit_pages_already_free_count_against_the_free_pages():
    G = 4
    kv = KVCacheManager(PagePool(4, G))
    a = Request("a", list(range(13)))
    compute(kv, a, 13)
    kv.free(a)  # 3 cached pages evictable + 1 plain page: all 4 free
    b = Request("b", list(range(12)) + [1, 2, 3, 4, 5, 6])
    hit = kv.get_computed_pages(b)
    assert hit.num_tokens == 12 and kv.pool.num_free == 4
    # 18 tokens need 5 pages; taking the 3 hit pages leaves 1 free page for 2 new ones.
    assert kv.allocate_slots(b, 6, hit) is None
    assert kv.pool.num_free == 4 and kv.pool.num_cached == 3
    assert kv.allocate_slots(b, 2, hit) is not None  # 14 tokens: 4 pages fit


def test_sliding_group_keeps_only_the_pages_its_window_sees():
    G, W = 4, 6
    glob, slid = PagePool(32, G), PagePool(8, G)
    kv = KVCacheManager([PageGroup(glob), PageGroup(slid, window=W)])
    r = Request("r", list(range(5)), SamplingParams(max_tokens=64))
    compute(kv, r, 5)
    for step in range(60):
        r.output_token_ids.append(1000 + step)
        s = r.num_computed_tokens
        g_table, s_table = compute(kv, r, 1)
        first_seen = max(0, s - W + 1) // G
        assert len(g_table) == len(s_table) == s // G + 1 and NULL_PAGE not in g_table
        assert all(p == NULL_PAGE for p in s_table[:first_seen]) and NULL_PAGE not in s_table[first_seen:]
        assert kv.num_held_pages(r)[1] <= -(-W // G) + 1
        assert slid.num_used == kv.num_held_pages(r)[1]
    assert glob.num_used == len(g_table) == 17
    kv.free(r)
    assert glob.num_free == 32 and slid.num_free == 8


def test_sliding_group_hit_needs_only_the_pages_its_window_sees():
    G, W = 4, 6
    glob, slid = PagePool(32, G), PagePool(6, G)
    kv = KVCacheManager([PageGroup(glob), PageGroup(slid, window=W)])
    a = Request("a", list(range(21)))
    a_glob, a_slid = (list(t) for t in compute(kv, a, 21))
    kv.free(a)
    b = Request("b", list(range(20)) + [7, 7, 7])
    hit = kv.get_computed_pages(b)
    # The query at position 20 sees 15..20: pages 3 and 4; pages 0..2 are not needed.
    assert hit.num_tokens == 20
    assert hit.page_tables == (tuple(a_glob[:5]), (NULL_PAGE,) * 3 + tuple(a_slid[3:5]))
    # Evict sliding page 4 (a freed it first, so it heads the LRU list; the plain page goes first).
    slid.allocate(2)
    assert slid.lookup(b.page_hashes[4]) is None
    hit = kv.get_computed_pages(b)
    # Position 16 sees 11..16: pages 2 and 3, both still cached.
    assert hit.num_tokens == 16
    assert hit.page_tables == (tuple(a_glob[:4]), (NULL_PAGE,) * 2 + tuple(a_slid[2:4]))


def test_for_layers_builds_one_group_per_attention_kind():
    types = ("sliding", "sliding", "global", "sliding", "global")
    kv = KVCacheManager.for_layers(types, 512, num_pages=100, page_size=16, num_sliding_pages=40)
    assert [(g.window, g.pool.num_pages) for g in kv.groups] == [(None, 100), (512, 40)]
    assert KVCacheManager.group_of_layer(types) == (1, 1, 0, 1, 0)
    only_sliding = KVCacheManager.for_layers(("sliding",) * 2, 64, num_pages=10, page_size=16)
    assert [g.window for g in only_sliding.groups] == [64]
    assert KVCacheManager.group_of_layer(("sliding",) * 2) == (0, 0)
    # One request's most pages at once: all of them globally; window + one chunk when sliding.
    assert kv.required_pages(10_000, 256) == (625, -(-(511 + 256) // 16) + 1)
    assert kv.required_pages(100, 256) == (7, 7)


def test_manager_rejects_inconsistent_groups():
    with pytest.raises(ValueError, match="one page size"):
        KVCacheManager([PageGroup(PagePool(4, 8)), PageGroup(PagePool(4, 16), window=8)])
    pool = PagePool(4, 8)
    with pytest.raises(ValueError, match="its own PagePool"):
        KVCacheManager([PageGroup(pool), PageGroup(pool, window=8)])
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        PageGroup(PagePool(4, 8), window=0)
    with pytest.raises(ValueError, match="non-empty"):
        KVCacheManager([])


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(PagePool(8, 4), enable_prefix_caching=False)
    a = Request("a", list(range(9)))
    compute(kv, a, 9)
    kv.free(a)
    assert kv.pool.num_cached == 0 and kv.get_computed_pages(Request("b", list(range(9)))).num_tokens == 0
