"""int8 KV cache pages: int8 keys or values with one float32 scale per (kv head, page).

A quantized page array is a ``qwix.QArray`` with ``qvalue`` int8 [K, P, G, H] and ``scale``
float32 [K, P, 1, 1] (qwix's tiled layout: one scale per G x H tile), so value ~= qvalue * scale.
It is what ``kestrel serve --kv-cache-dtype int8`` keeps per layer, instead of [K, P, G, H] in the
compute dtype: 1 byte per element plus 4 bytes per page and kv head (bf16: 2 bytes per element).

How a page's scale follows the tokens appended to it: a fresh page has scale 0. When a step
writes new tokens, each touched (kv head, page) takes ``scale = max(scale, absmax(new) / 127)``
over the step's new tokens of that page; if the scale grew, the int8 values already in the page
are requantized to it (``round(q * old / new)``), then the new tokens are quantized with the
page's scale. A scale never shrinks while the page is in use; a write at offset 0 starts the
page afresh (a freed page being reused), so its scale restarts from that step's tokens and stale
values are zeroed. Each requantization adds at most half a
step of rounding error to the older tokens; in practice a page's scale settles after its first
few tokens, since keys and values of one head have similar ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from jaxtyping import Array, Float, Int

QMAX = 127.0


def is_int8_pages(pages) -> bool:
    return isinstance(pages, qwix.QArray)


def create_int8_pages(shape: tuple[int, int, int, int]) -> qwix.QArray:
    """Zeroed int8 pages of ``shape`` [K, P, G, H] with zero scales."""
    kh, p = shape[:2]
    return qwix.QArray(qvalue=jnp.zeros(shape, jnp.int8),
                       scale=jnp.zeros((kh, p, 1, 1), jnp.float32), qtype=jnp.int8)


def write_int8_pages(pages: qwix.QArray, slots: Int[Array, "N"],
                     new: Float[Array, "N K H"]) -> qwix.QArray:
    """Stores new keys (or values) into int8 pages, growing and requantizing page scales.

    Args:
      pages: int8 pages [K, P, G, H] with scales [K, P, 1, 1].
      slots: flat slot ``page * G + offset`` of each new token; ``P * G`` or more: dropped
        (padding).
      new: the new tokens' keys or values.

    Returns:
      The updated pages.
    """
    kh, p, g, h = pages.shape
    page_of = slots // g  # [N]; >= P for padding, dropped by the scatters
    # A token written at offset 0 starts its page: the page's previous contents (a freed page
    # reused) are stale, so its scale restarts from this step's tokens instead of growing on.
    starts = jnp.zeros((p,), bool).at[jnp.where(slots % g == 0, page_of, p)].set(True, mode="drop")
    old = jnp.where(starts[None, :], 0.0, pages.scale[:, :, 0, 0])  # [K, P]
    amax = jnp.abs(new.astype(jnp.float32)).max(axis=-1).T  # [K, N]
    scale = old.at[:, page_of].max(amax / QMAX, mode="drop")  # [K, P]
    safe = jnp.where(scale > 0, scale, 1.0)
    # Requantize the touched pages to their (possibly larger) scale; duplicates write equal data.
    touched = jnp.clip(page_of, 0, p - 1)
    ratio = (old / safe)[:, touched][..., None, None]  # [K, N, 1, 1]
    kept = jnp.round(pages.qvalue[:, touched].astype(jnp.float32) * ratio).astype(jnp.int8)
    qvalue = pages.qvalue.at[:, page_of].set(kept, mode="drop")  # [K, P, G, H]
    token_scale = safe[:, touched][..., None]  # [K, N, 1]
    q_new = jnp.clip(jnp.round(new.astype(jnp.float32).transpose(1, 0, 2) / token_scale),
                     -QMAX, QMAX).astype(jnp.int8)  # [K, N, H]
    qvalue = qvalue.reshape(kh, p * g, h).at[:, slots].set(q_new, mode="drop").reshape(kh, p, g, h)
    return qwix.QArray(qvalue=qvalue, scale=scale[..., None, None], qtype=jnp.int8)


def gather_pages(pages, table: Int[Array, "B M"], dtype, *, kv_major: bool = False):
    """The dense view of each row's pages (float or int8, dequantized): [B, M * G, K, H], or
    [K, B, M * G, H] with ``kv_major`` (the order the gather produces, with no transpose)."""
    kh, _, g, h = pages.shape
    b, m = table.shape
    if is_int8_pages(pages):
        values = pages.qvalue[:, table].astype(dtype) * pages.scale[:, table].astype(dtype)
    else:
        values = pages[:, table].astype(dtype)  # [K, B, M, G, H]
    values = values.reshape(kh, b, m * g, h)
    return values if kv_major else values.transpose(1, 2, 0, 3)


def kv_bytes(pages) -> int:
    """Bytes of a page array (int8 values and scales, or float pages)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pages)))
