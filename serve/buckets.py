"""Shape buckets of the runner's jitted steps, pure Python so the memory planner shares them.

A warm engine never recompiles for a new request length because every dynamic size is rounded up
to a bucket; the planner rounds the same way, so the tensors it sizes are the ones that exist.
"""

from __future__ import annotations

# Floats per row (gathered keys and values plus scores) below which padding rows, which save
# compilations, cost nothing worth saving: 2^20 float32 are 4 MiB.
SMALL_ROW_FLOATS = 1 << 20

# Query tokens per row of a prefill step's attention (``ModelRunner(prefill_tile=...)``): 64 cut
# SmolLM2's 32-prompt prefill steps by 16% on CPU against rows padded to the longest chunk (32:
# about the same, 16: no gain; outputs identical).
PREFILL_TILE = 64

# The smallest page-table bucket, in pages. 8 rather than 16: SmolLM2 serving of 32 requests of
# 110-194 final tokens ran 11% faster end to end (tables of 12 pages, not 16, for most of the
# decode), outputs identical, for one or two more compiled widths.
MIN_TABLE_PAGES = 8


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 2^k and 3 * 2^(k-1) that is >= n (and >= minimum): padding stays under a
    third of a prefill's tokens (a power-of-two bucket can nearly double them)."""
    b = pow2(n, minimum)
    return b * 3 // 4 if b * 3 // 4 >= max(n, minimum) else b


def table_bucket(n: int, minimum: int) -> int:
    """Page-table width bucket: 2^k or 3 * 2^(k-1) (so a long prompt's tables, and the keys its
    prefill chunks gather, exceed the pages in use by under a third rather than up to double)."""
    return length_bucket(n, minimum)


def batch_rows(n: int, t: int, max_keys: int, floats_per_key: int, min_batch: int) -> int:
    """Rows of a step of ``n`` sequences with ``t`` query slots each over at most ``max_keys``.

    Padding rows save compilations, but where attention gathers pages (the reference, on CPU) a
    row gathers its whole page table and scores it: ``floats_per_key`` (``N T + 2 K H``) per key.
    Past a small size a long sequence would pay ``min_batch`` times that for nothing.
    """
    small = max_keys * floats_per_key <= SMALL_ROW_FLOATS
    return pow2(n, min_batch if small else 1)


def tiles_pay(rows: int, t: int, tiled_rows: int, tile: int, heads: int, kv_floats: int) -> bool:
    """Whether a prefill step is cut into query tiles: when the tiled grid gathers and scores
    fewer floats per key than the grid of one row per sequence. Each row gathers its sequence's
    whole table (``kv_floats`` = 2 K H per key) and scores ``heads`` x its query slots against
    it, so tiles win when chunks differ in length and lose when one long chunk would be gathered
    once per tile."""
    return tiled_rows * (heads * tile + kv_floats) < rows * (heads * t + kv_floats)


def tile_rows(n: int, min_batch: int) -> int:
    """Rows of a prefill step cut into ``n`` query tiles: 2^k or 3 * 2^(k-1), at least
    ``min_batch`` (tile counts vary more finely than sequence counts)."""
    return length_bucket(n, min_batch)


def min_table_width(window: int | None, t: int, page_size: int, min_table_pages: int) -> int:
    """The smallest table bucket of a group: ``min_table_pages``, but for a sliding group never
    more than the pages its window and ``t`` new tokens can span, so a sliding table keeps one
    width however large ``min_table_pages`` is set to spare the global tables' compilations."""
    if window is None:
        return min_table_pages
    return min(min_table_pages, -(-(window - 1 + t) // page_size) + 1)
