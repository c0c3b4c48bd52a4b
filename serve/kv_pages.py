"""Paged KV cache bookkeeping: a page pool with a prefix index, and the per-request page tables.

Pure Python (no JAX). The model runner owns the K/V arrays (``[K, P, G, H]`` per layer, the layout
of ``model/kernels/paged.py``); this module decides which physical page ``p`` in ``[0, P)`` holds
tokens ``[i*G, (i+1)*G)`` of a request.

Prefix cache (after vLLM v1's block pool): a page is *full* when all G of its tokens are computed.
Full pages are keyed by ``sha256(parent key, the page's token ids, extra keys)``, where the extra
keys are the content hashes of images whose placeholder tokens the page overlaps, plus, for the
first page, the request's ``cache_salt`` (which so changes every key after it). Equal keys mean equal K/V (the model
is causal), so a page with a key is shared copy-free by every request whose prefix hashes to it:
turns of one conversation, batch lines with one system prompt. Pages carry reference counts. A
page whose count drops to zero keeps its key and joins an LRU list of evictable pages; it is
reused, losing its key, only when no never-keyed free page is left, least recently freed first.
A request frees its pages tail first, so a prefix's first pages, the most widely shared, are
evicted last.

Layer groups: each group of layers with the same attention span has its own pool and page table.
The global group (``window=None``) keeps every page of a request. A sliding group (window W, a
query at ``q`` sees keys ``q - W < k <= q``) keeps only the pages its window can still see: before
each step that starts at position ``s``, pages wholly below ``s - W + 1`` are released, so a
decoding request holds at most ``ceil(W / G) + 1`` pages of that group. Released entries of a
sliding page table read ``NULL_PAGE`` (-1); the runner must map them to any valid page (e.g.
``np.maximum(table, 0)``) before the paged kernel's bounds check; the window mask hides those
positions, so what the page holds is never read. All groups use one page size so one
logical page index means the same token range in every group.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
from typing import Sequence

from serve.request import Request

NULL_PAGE = -1
_ROOT = b"kestrel/prefix-cache/v1"


def page_hash(parent: bytes | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()) -> bytes:
    """Prefix-cache key of one full page.

    Args:
      parent: key of the previous page, or ``None`` for a request's first page.
      token_ids: the page's G token ids.
      extra_keys: strings that change what the tokens mean (image content hashes, cache salt).

    Returns:
      A 32-byte sha256 digest (a collision would silently share wrong K/V, so not ``hash()``).
    """
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(array.array("q", token_ids).tobytes())
    for key in extra_keys:
        h.update(b"\x00" + key.encode())
    return h.digest()


class PagePool:
    """A fixed set of KV pages with reference counts, a free list and a prefix index.

    Args:
      num_pages: P, physical pages.
      page_size: G, tokens per page.
    """

    def __init__(self, num_pages: int, page_size: int):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an int >= 1, got {num_pages!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._ref = [0] * num_pages
        self._key: list[bytes | None] = [None] * num_pages
        self._index: dict[bytes, int] = {}
        # Unkeyed free pages are handed out before any keyed one, so cached prefixes live longest.
        self._free_plain = list(range(num_pages - 1, -1, -1))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Pages with no reference (never-keyed ones plus evictable cached ones)."""
        return len(self._free_plain) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one request."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages holding a prefix key (referenced or evictable)."""
        return len(self._index)

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def key(self, page: int) -> bytes | None:
        return self._key[page]

    def evictable_pages(self) -> list[int]:
        """Unreferenced cached pages, next to be evicted first."""
        return list(self._evictable)

    def lookup(self, key: bytes) -> int | None:
        """The page holding ``key``, or ``None``."""
        return self._index.get(key)

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free pages, each with reference count 1.

        Raises:
          ValueError: fewer than ``n`` pages are free.
        """
        if n > self.num_free:
            raise ValueError(f"allocate({n}): only {self.num_free} of {self.num_pages} pages are free")
        out = []
        for _ in range(n):
            if self._free_plain:
                page = self._free_plain.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._index[self._key[page]]
                self._key[page] = None
                self.num_evictions += 1
            self._ref[page] = 1
            out.append(page)
        return out

    def acquire(self, pages: Sequence[int]) -> None:
        """Adds a reference to each cached page (a prefix hit), taking it off the LRU list."""
        for page in pages:
            if self._key[page] is None:
                raise ValueError(f"acquire: page {page} holds no prefix key; only cached pages are shared")
            if self._ref[page] == 0:
                del self._evictable[page]
            self._ref[page] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drops one reference from each page; pages reaching zero become free in the given order."""
        for page in pages:
            if self._ref[page] <= 0:
                raise ValueError(f"free: page {page} is not allocated (double free)")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if self._key[page] is None:
                    self._free_plain.append(page)
                else:
                    self._evictable[page] = None

    def cache(self, page: int, key: bytes) -> bool:
        """Indexes a referenced full page under ``key``.

        Returns:
          Whether the page now holds ``key``; ``False`` when another page already does (two
          requests computed the same prefix at once) and this one stays unkeyed.
        """
        if self._ref[page] <= 0:
            raise ValueError(f"cache: page {page} is not allocated")
        if self._key[page] is not None:
            if self._key[page] != key:
                raise ValueError(f"cache: page {page} already holds a different prefix key")
            return True
        if key in self._index:
            return False
        self._index[key] = page
        self._key[page] = key
        return True

    def reset_prefix_cache(self) -> int:
        """Forgets the keys of all unreferenced pages (e.g. after new weights). Returns how many."""
        n = len(self._evictable)
        for page in self._evictable:
            del self._index[self._key[page]]
            self._key[page] = None
            self._free_plain.append(page)
        self._evictable.clear()
        return n


@dataclasses.dataclass(frozen=True)
class PageGroup:
    """Layers that share a page table: their pool and attention window.

    Attributes:
      pool: the pages of these layers (the runner's K/V arrays for them have ``pool.num_pages``
        pages).
      window: ``None`` for global layers; W for sliding-window layers.
    """

    pool: PagePool
    window: int | None = None

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"PageGroup.window must be None or an int >= 1, got {self.window!r}")


@dataclasses.dataclass(frozen=True)
class CacheHit:
    """The longest cached prefix of a request, found but not yet taken.

    Attributes:
      num_tokens: tokens the hit covers (a multiple of the page size).
      page_tables: per group, the cached pages in logical order (``NULL_PAGE`` below a sliding
        group's window).
    """

    num_tokens: int
    page_tables: tuple[tuple[int, ...], ...]


@dataclasses.dataclass
class PrefixCacheStats:
    """Prefix-cache counters, in tokens, counted when a request is admitted (re-admissions too)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pages_held(num_tokens: int, window: int | None, max_chunk: int, page_size: int) -> int:
    """Most pages one request of ``num_tokens`` tokens ever holds at once in one group.

    A global group (``window=None``) holds every page; a sliding group holds the pages its window
    sees from a step's first query plus that step's (at most ``max_chunk``) new tokens, and one
    more for a window that does not start on a page boundary.
    """
    need = _ceil_div(num_tokens, page_size)
    if window is None:
        return need
    return min(need, _ceil_div(window - 1 + max_chunk, page_size) + 1)


class KVCacheManager:
    """Per-request page tables over one or more page groups, with prefix caching.

    Args:
      groups: a single ``PagePool`` (every layer global) or one ``PageGroup`` per layer group.
      enable_prefix_caching: look up and index full pages by prefix key.
    """

    def __init__(self, groups: PagePool | Sequence[PageGroup], *, enable_prefix_caching: bool = True):
        if isinstance(groups, PagePool):
            groups = (PageGroup(groups),)
        groups = tuple(groups)
        if not groups or not all(isinstance(g, PageGroup) for g in groups):
            raise ValueError("groups must be a PagePool or a non-empty sequence of PageGroup")
        sizes = {g.pool.page_size for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"all page groups must use one page size, got {sorted(sizes)}")
        if len({id(g.pool) for g in groups}) != len(groups):
            raise ValueError("each page group needs its own PagePool")
        self.groups = groups
        self.page_size = sizes.pop()
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._all_global = all(g.window is None for g in groups)
        self._tables: dict[str, list[list[int]]] = {}
        self._num_keyed: dict[str, int] = {}  # leading logical pages already offered to the index

    @classmethod
    def for_layers(
        cls,
        layer_types: Sequence[str],
        sliding_window: int | None,
        *,
        num_pages: int,
        page_size: int,
        num_sliding_pages: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> "KVCacheManager":
        """Builds the groups a model needs from ``ModelConfig.layer_types`` / ``sliding_window``.

        Groups come out global first (if any layer is global), then sliding; the runner maps
        layer ``l`` to group ``group_of_layer(layer_types)[l]``.
        """
        kinds = set(layer_types)
        groups = []
        if "global" in kinds:
            groups.append(PageGroup(PagePool(num_pages, page_size)))
        if "sliding" in kinds:
            groups.append(PageGroup(PagePool(num_sliding_pages or num_pages, page_size), window=sliding_window))
        return cls(groups, enable_prefix_caching=enable_prefix_caching)

    @staticmethod
    def group_of_layer(layer_types: Sequence[str]) -> tuple[int, ...]:
        """For each layer, the index of its group in ``for_layers``' order."""
        has_global = "global" in layer_types
        return tuple(1 if (t == "sliding" and has_global) else 0 for t in layer_types)

    # ------------------------------------------------------------------ sizes and counters

    @property
    def pool(self) -> PagePool:
        """The first group's pool (the only one for an all-global model)."""
        return self.groups[0].pool

    @property
    def num_free(self) -> int:
        """Free pages of the first group."""
        return self.groups[0].pool.num_free

    def required_pages(self, num_tokens: int, max_chunk: int) -> tuple[int, ...]:
        """Most pages, per group, one request of ``num_tokens`` ever holds at once."""
        return tuple(pages_held(num_tokens, g.window, max_chunk, self.page_size) for g in self.groups)

    def page_tables(self, request: Request) -> tuple[list[int], ...]:
        """The request's current page table per group (live lists; copy before keeping)."""
        return tuple(self._tables.get(request.request_id, [[] for _ in self.groups]))

    # ------------------------------------------------------------------ prefix cache

    def page_hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """The prefix keys of the request's first ``num_pages`` pages (all full), computed once."""
        hashes = request.page_hashes
        G = self.page_size
        for i in range(len(hashes), num_pages):
            extra = [s.content_hash for s in request.mm_spans if s.offset < (i + 1) * G and s.offset + s.length > i * G]
            if i == 0 and request.cache_salt is not None:
                extra.append("salt:" + request.cache_salt)
            hashes.append(page_hash(hashes[i - 1] if i else None, request.token_slice(i * G, (i + 1) * G), extra))
        return hashes

    def get_computed_pages(self, request: Request) -> CacheHit:
        """Finds the longest prefix of full pages cached in every group; takes nothing yet.

        At least the request's last token is left to compute, so the step that computes it can
        sample. A sliding group needs only the cached pages its window sees at the hit's end.
        """
        no_hit = CacheHit(0, tuple(() for _ in self.groups))
        if not self.enable_prefix_caching:
            return no_hit
        G = self.page_size
        limit = (request.num_tokens - 1) // G
        if limit == 0:
            return no_hit
        hashes = self.page_hashes(request, limit)
        found = [[g.pool.lookup(h) for h in hashes] for g in self.groups]
        k = limit
        for g, pages in zip(self.groups, found):
            if g.window is None:  # a global group needs every page of the prefix
                k = min(k, next((i for i, p in enumerate(pages) if p is None), limit))
        for g, pages in zip(self.groups, found):
            if g.window is not None:
                last_miss, misses = -1, []  # misses[i]: last uncached index <= i
                for i, p in enumerate(pages):
                    last_miss = i if p is None else last_miss
                    misses.append(last_miss)
                while k > 0 and misses[k - 1] >= max(0, k * G - g.window + 1) // G:
                    k -= 1
        if k == 0:
            return no_hit
        tables = []
        for g, pages in zip(self.groups, found):
            lo = 0 if g.window is None else max(0, k * G - g.window + 1) // G
            tables.append(tuple([NULL_PAGE] * lo + pages[lo:k]))
        return CacheHit(k * G, tuple(tables))

    def cache_full_pages(self, request: Request) -> None:
        """Indexes the request's pages that are now full of computed tokens (call after a step)."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        tables = self._tables.get(rid)
        if tables is None:
            return
        start, stop = self._num_keyed[rid], request.num_computed_tokens // self.page_size
        if stop <= start:
            return
        hashes = self.page_hashes(request, stop)
        for g, table in zip(self.groups, tables):
            for i in range(start, stop):
                if table[i] != NULL_PAGE:
                    g.pool.cache(table[i], hashes[i])
        self._num_keyed[rid] = stop

    # ------------------------------------------------------------------ allocation

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: CacheHit | None = None) -> tuple[list[int], ...] | None:
        """Makes room for the next ``num_new_tokens`` tokens of ``request``.

        Computation starts at ``request.num_computed_tokens`` plus the hit's tokens; ``hit`` (from
        ``get_computed_pages``) is taken only on an admission, before the request holds pages.
        All groups allocate or none does. Sliding groups first release pages the step's first
        query can no longer see.

        Returns:
          The page table per group, or ``None`` when some pool lacks free pages (nothing taken).
        """
        if num_new_tokens < 1:
            raise ValueError(f"allocate_slots: num_new_tokens must be >= 1, got {num_new_tokens}")
        rid, G = request.request_id, self.page_size
        tables = self._tables.get(rid)
        if hit is not None and hit.num_tokens and (tables is not None or request.num_computed_tokens):
            raise ValueError(f"allocate_slots: request {rid!r} already holds pages; a cache hit applies only at admission")
        hit_tokens = hit.num_tokens if hit is not None else 0
        start = request.num_computed_tokens + hit_tokens
        end = start + num_new_tokens
        if tables is not None:
            if self._all_global and len(tables[0]) * G >= end:
                return tuple(tables)  # a decode inside its last page: the common case, kept cheap
            self._release_outside_window(tables, start)
        base = tables if tables is not None else [list(t) for t in (hit.page_tables if hit_tokens else [()] * len(self.groups))]
        needs = []
        for g, table in zip(self.groups, base):
            n_new = _ceil_div(end, G) - len(table)
            fresh = [] if tables is not None else [p for p in table if p != NULL_PAGE]
            # Hit pages nobody references sit in the free count; taking them shrinks it.
            taken_from_free = sum(1 for p in fresh if g.pool.ref_count(p) == 0)
            if max(n_new, 0) > g.pool.num_free - taken_from_free:
                return None
            needs.append((n_new, fresh))
        for g, table, (n_new, fresh) in zip(self.groups, base, needs):
            g.pool.acquire(fresh)
            if n_new > 0:
                table.extend(g.pool.allocate(n_new))
        if tables is None:
            self._tables[rid] = base
            self._num_keyed[rid] = hit_tokens // G
            self.stats.queries += request.num_tokens
            self.stats.hits += hit_tokens
        return tuple(self._tables[rid])

    def _release_outside_window(self, tables: list[list[int]], start: int) -> None:
        for g, table in zip(self.groups, tables):
            if g.window is None:
                continue
            first_seen = max(0, start - g.window + 1) // self.page_size
            for i in range(min(first_seen, len(table)) - 1, -1, -1):
                if table[i] == NULL_PAGE:
                    break  # everything below was released earlier
                g.pool.free([table[i]])
                table[i] = NULL_PAGE

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Frees the request's pages past its first ``num_tokens`` tokens, tail first.

        Speculative decoding writes K/V for draft tokens before knowing which survive; once the
        verification has committed ``num_tokens``, pages holding only rejected slots go back to
        the pool. They were never keyed: ``cache_full_pages`` keys only pages of computed,
        committed tokens, so the prefix index never points at a rejected draft.
        """
        if num_tokens < 0:
            raise ValueError(f"truncate: num_tokens must be >= 0, got {num_tokens}")
        tables = self._tables.get(request.request_id)
        if tables is None:
            return
        keep = _ceil_div(num_tokens, self.page_size)
        if keep < self._num_keyed.get(request.request_id, 0):
            raise ValueError(f"truncate: request {request.request_id!r} would drop keyed pages")
        for g, table in zip(self.groups, tables):
            tail = table[keep:]
            del table[keep:]
            g.pool.free([p for p in reversed(tail) if p != NULL_PAGE])

    def free(self, request: Request) -> None:
        """Returns all the request's pages; keyed ones stay cached until evicted."""
        tables = self._tables.pop(request.request_id, None)
        self._num_keyed.pop(request.request_id, None)
        if tables is None:
            return
        for g, table in zip(self.groups, tables):
            g.pool.free([p for p in reversed(table) if p != NULL_PAGE])

    def num_held_pages(self, request: Request) -> tuple[int, ...]:
        """Pages the request references now, per group."""
        tables = self._tables.get(request.request_id)
        if tables is None:
            return tuple(0 for _ in self.groups)
        return tuple(sum(p != NULL_PAGE for p in t) for t in tables)
