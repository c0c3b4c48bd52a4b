"""Paged decode attention: a few new query tokens per sequence against a paged KV cache.

Layout (shared with the serving engine): ``k_pages`` / ``v_pages`` [K, P, G, H] hold P physical
pages of G tokens per kv head; ``page_table`` [B, max_pages] int32 maps each sequence's logical
page j (tokens j*G .. j*G+G-1) to a physical page; ``lengths`` [B] counts the tokens in the cache,
new ones included. The T queries of sequence b sit at positions lengths[b]-T .. lengths[b]-1 and
are causal among themselves (T = 1: decode; T > 1: speculative verification).

The Pallas kernel is flash-decoding: the grid is (B, K, splits) and each program reduces a
contiguous range of logical pages with an online softmax, so a single long sequence still spreads
over many programs; a cheap jnp pass merges the splits by their log-sum-exp. All T x N/K query rows
of one kv head share every page load. Pages past the length, and pages wholly left of the sliding
window, are never read: each program's loop bounds come from the length and the window. One
page is one loop step, so on GPU (Triton) G must be a power of two >= 16; 64 or more keeps each
load large enough to stream at HBM speed.

Page-table bounds are checked (``ValueError``) when ``page_table`` and ``lengths`` are concrete.
Under ``jit`` they are tracers and cannot be checked; the kernel then clamps page ids into
[0, P), so a bad table reads a wrong page but never out of bounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from model.kernels.attention import (attention_reference, kernel_head_dim, mask_from_description,
                                     resolve_impl)
from model.kernels.grouped import grouped_attention, runs_grouped
from model.kernels.flash import next_pow2, triton_params
from model.kv_int8 import gather_pages, is_int8_pages


def check_paged_inputs(q, k_pages, v_pages, page_table, lengths, window) -> None:
    """Shape and argument checks shared by the kernel and the reference; raise before tracing."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [K, P, G, H], got shape {k_pages.shape}")
    if is_int8_pages(k_pages) != is_int8_pages(v_pages):
        raise ValueError("k_pages and v_pages must both be int8 (QArray) pages or both float")
    if is_int8_pages(k_pages) and k_pages.scale.shape != (*k_pages.shape[:2], 1, 1):
        raise ValueError(f"int8 pages need one scale per (kv head, page), [K, P, 1, 1] = "
                         f"{(*k_pages.shape[:2], 1, 1)}; got {k_pages.scale.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} differs from k_pages shape "
                         f"{k_pages.shape}")
    b, t, n, h = q.shape
    kh, p, g, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"k_pages head dim {hk} differs from q head dim {h}")
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, max_pages] with B={b}, got {page_table.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]=({b},), got {lengths.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if isinstance(lengths, jax.core.Tracer) or isinstance(page_table, jax.core.Tracer):
        return  # traced: bounds cannot be checked here; the kernel clamps page ids instead
    lens = np.asarray(lengths)
    capacity = page_table.shape[1] * g
    if (lens < t).any() or (lens > capacity).any():
        raise ValueError(f"lengths must lie in [T, max_pages * G] = [{t}, {capacity}], "
                         f"got {lens.tolist()}")
    table = np.asarray(page_table)
    used = np.arange(table.shape[1])[None, :] < -(-lens[:, None] // g)  # [B, max_pages]
    bad = used & ((table < 0) | (table >= p))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"page_table[{row}, {col}] = {int(table[row, col])} points outside the "
                         f"cache of P={p} pages")


def _decode_positions(lengths, t: int, s: int):
    """(query positions [B, T], key positions [B, S]) of a decode / verify step: keys at their
    slots (-1 past the length), the queries the last T of them."""
    slots = jnp.arange(s, dtype=jnp.int32)[None, :]
    kv_positions = jnp.where(slots < lengths[:, None], slots, -1)
    q_positions = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    return q_positions, kv_positions


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, window=None,
                              scale=None, soft_cap=None):
    """Plain-jnp paged attention: gathers the pages (dequantized when int8) into a dense cache and
    runs the reference."""
    p = k_pages.shape[1]
    table = jnp.clip(page_table, 0, p - 1)
    k, v = gather_pages(k_pages, table, q.dtype), gather_pages(v_pages, table, q.dtype)  # [B, S, K, H]
    q_positions, kv_positions = _decode_positions(lengths, q.shape[1], k.shape[1])
    return attention_reference(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                               causal=True, window=window, scale=scale, soft_cap=soft_cap)


def paged_attention_grouped(q, k_pages, v_pages, page_table, lengths, *, window=None,
                            scale=None, soft_cap=None):
    """The CPU path: the pages gathered kv-head-major and ``grouped_attention`` (no transposes of
    the gathered keys and values; see ``model/kernels/grouped.py``)."""
    p = k_pages.shape[1]
    table = jnp.clip(page_table, 0, p - 1)
    k = gather_pages(k_pages, table, q.dtype, kv_major=True)  # [K, B, S, H]
    v = gather_pages(v_pages, table, q.dtype, kv_major=True)
    q_positions, kv_positions = _decode_positions(lengths, q.shape[1], k.shape[2])
    mask = mask_from_description(q_positions, kv_positions, causal=True, window=window,
                                 q_segment_ids=None, kv_segment_ids=None, q_span_ids=None,
                                 kv_span_ids=None)
    return grouped_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                             soft_cap=soft_cap)


def _decode_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *refs, t, groups, page,
                   pages_per_split, scale, soft_cap, window, quantized):
    """One (sequence, kv head, split): online softmax over the split's pages in the window.

    With int8 pages (``quantized``), ``refs`` starts with the per-page K and V scales [P]; a page's
    int8 tile is cast to q's dtype and its scale multiplies the page's scores (K) and its
    probability-weighted sum (V), which is exact because the scale is constant over the page.
    """
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    length = len_ref[0]
    rows, h = q_ref.shape
    q = q_ref[...]  # [R, H]: row r is token r // groups of query head r % groups
    q_pos = length - t + jnp.minimum(jnp.arange(rows) // groups, t - 1)  # [R]
    lo = 0 if window is None else jnp.maximum(length - t - window + 1, 0)
    split = pl.program_id(2)
    first = jnp.maximum(split * pages_per_split, lo // page)
    last = jnp.minimum((split + 1) * pages_per_split, (length + page - 1) // page)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ()))

    def body(j, carry):
        o, m, l = carry
        phys = table_ref[j]
        k = k_ref[phys]  # [G, H]
        v = v_ref[phys]
        k_scale = v_scale = 1.0
        if quantized:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            k_scale, v_scale = ks_ref[phys], vs_ref[phys]
        s = jax.lax.dot_general(q, k, dims, precision=precision,
                                preferred_element_type=jnp.float32) * (scale * k_scale)  # [R, G]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = j * page + jnp.arange(page)[None, :]
        ok = (k_pos < length) & (k_pos <= q_pos[:, None])
        if window is not None:
            ok = ok & (q_pos[:, None] - k_pos < window)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32) * v_scale
        return alpha[:, None] * o + pv, m_new, alpha * l + p.sum(axis=-1)

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _paged_pallas(q, k_pages, v_pages, page_table, lengths, *, window, scale, soft_cap,
                  num_splits, interpret):
    b, t, n, h = q.shape
    kh, p, g, _ = k_pages.shape
    groups = n // kh
    max_pages = page_table.shape[1]
    splits = max(1, min(num_splits, max_pages))
    per_split = -(-max_pages // splits)
    rows = t * groups
    rows_pad = next_pow2(max(rows, 16))  # Triton dots need >= 16 rows
    # [B, T, N, H] -> [B, K, T * N/K, H]: one kv head's query rows side by side.
    qg = q.reshape(b, t, kh, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    table = jnp.clip(page_table.astype(jnp.int32), 0, p - 1)
    table = jnp.pad(table, ((0, 0), (0, next_pow2(max_pages) - max_pages)))
    quantized = is_int8_pages(k_pages)
    kernel = functools.partial(_decode_kernel, t=t, groups=groups, page=g,
                               pages_per_split=per_split, scale=scale, soft_cap=soft_cap,
                               window=window, quantized=quantized)
    page_spec = pl.BlockSpec((None, p, g, h), lambda b_, k_, s_: (k_, 0, 0, 0))
    operands, specs = [k_pages, v_pages], [page_spec, page_spec]
    if quantized:
        # int8 values stream as they are; the per-page scales [K, P] (padded to a power of two
        # for Triton's block shapes) ride along, one row per kv head.
        scales = lambda x: jnp.pad(x.scale[:, :, 0, 0], ((0, 0), (0, next_pow2(p) - p)))  # noqa: E731
        operands = [k_pages.qvalue, v_pages.qvalue, scales(k_pages), scales(v_pages)]
        scale_spec = pl.BlockSpec((None, next_pow2(p)), lambda b_, k_, s_: (k_, 0))
        specs = [page_spec, page_spec, scale_spec, scale_spec]
    part = lambda *tail: pl.BlockSpec((None, None, None) + tail,  # noqa: E731
                                      lambda b_, k_, s_: (b_, k_, s_) + (0,) * len(tail))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[pl.BlockSpec((None, 1), lambda b_, k_, s_: (b_, 0)),
                  pl.BlockSpec((None, table.shape[1]), lambda b_, k_, s_: (b_, 0)),
                  pl.BlockSpec((None, None, rows_pad, h), lambda b_, k_, s_: (b_, k_, 0, 0)),
                  *specs],
        out_specs=[part(rows_pad, h), part(rows_pad), part(rows_pad)],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, rows_pad, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, rows_pad), jnp.float32)],
        interpret=interpret, name="kestrel_paged_decode",
        compiler_params=None if interpret or jax.default_backend() == "tpu" else triton_params(
            num_warps=4, num_stages=2),
    )(lengths.astype(jnp.int32)[:, None], table, qg, *operands)
    # Merge the splits: rescale each by exp(m_split - m_max); splits that saw nothing have l = 0.
    m_max = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))  # [B, K, splits, R]
    num = (w[..., None] * o).sum(axis=2)  # [B, K, R, H]
    den = (w * l).sum(axis=2)[..., None]
    out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)[:, :, :rows]
    out = out.reshape(b, kh, t, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    return out.astype(q.dtype)


def default_splits(batch: int, kv_heads: int, max_pages: int) -> int:
    """Enough splits that B x K x splits programs fill an H100's 132 SMs about twice."""
    return max(1, min(max_pages, -(-264 // max(1, batch * kv_heads))))


def paged_attention(
    q: Float[Array, "B T N H"],
    k_pages: Float[Array, "K P G H"],
    v_pages: Float[Array, "K P G H"],
    page_table: Int[Array, "B M"],
    lengths: Int[Array, "B"],
    *,
    window: int | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    num_splits: int | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
) -> Float[Array, "B T N H"]:
    """Attention of each sequence's last T tokens over its paged cache.

    Args:
      q: [B, T, N, H] queries at positions lengths - T .. lengths - 1 (causal among themselves).
      k_pages, v_pages: [K, P, G, H] paged keys and values; N a multiple of K. Either float
        arrays or int8 ``qwix.QArray`` pages with [K, P, 1, 1] scales (``model/kv_int8.py``),
        which both implementations dequantize page by page.
      page_table: [B, max_pages] physical page of each logical page.
      lengths: [B] tokens in each sequence's cache, the T new ones included.
      window: left sliding window W, or None; pages wholly outside it are not read.
      scale: logit scale (default 1/sqrt(H)). soft_cap: tanh cap on logits.
      num_splits: key-axis splits per (sequence, kv head) (default: fill the device).
      impl: ``auto`` | ``pallas`` | ``reference`` (``xla`` and ``cudnn`` mean the reference);
        ``auto`` is the Pallas kernel on GPU and TPU and ``paged_attention_grouped`` on CPU.
      interpret: force Pallas interpret mode (default: on exactly on CPU).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    check_paged_inputs(q, k_pages, v_pages, page_table, lengths, window)
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if runs_grouped(impl):
        return paged_attention_grouped(q, k_pages, v_pages, page_table, lengths, window=window,
                                       scale=scale, soft_cap=soft_cap)
    if resolve_impl(impl) != "pallas" or kernel_head_dim(q.shape[-1]) != q.shape[-1]:
        # The kernel's tiles must be powers of two; padding the cache's pages every call would
        # copy the whole cache, so other head widths take the reference.
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths,
                                         window=window, scale=scale, soft_cap=soft_cap)
    if num_splits is None:
        num_splits = default_splits(q.shape[0], k_pages.shape[0], page_table.shape[1])
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    return _paged_pallas(q, k_pages, v_pages, jnp.asarray(page_table), jnp.asarray(lengths),
                         window=window, scale=scale, soft_cap=soft_cap, num_splits=num_splits,
                         interpret=interpret)
