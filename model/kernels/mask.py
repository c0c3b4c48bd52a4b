"""Attention masks as descriptions, and their block-sparsity metadata.

A mask is never materialised as a T x S array. It is described by per-token arrays (absolute
positions, segment ids, span ids) plus two static knobs (causal, window), and one function,
``visible``, says which (query, key) pairs it allows. Kernels evaluate ``visible`` on one tile at
a time, and only on tiles that need it.

Block sparsity follows splash attention's ``MaskInfo`` (jax.experimental.pallas.ops.tpu.
splash_attention): every (query block, key block) pair is ``EMPTY`` (skipped entirely),
``PARTIAL`` (computed with the element mask) or ``FULL`` (computed without it). Splash builds that
table from a static NumPy mask; Kestrel's positions are runtime arrays (a decode step writes into a
cache), so the table is computed from per-block min/max bounds of positions, segment ids and span
ids (tokamax's per-tile bounds), with cheap jnp ops before the kernel. The bounds are conservative:
``EMPTY`` and ``FULL`` are exact claims, anything uncertain is ``PARTIAL``. When every mask array is
concrete (no tracer: the caller passed no positions, or NumPy ones), the same code runs in NumPy at
trace time, so the table is a compile-time constant (the static fast path used in training).

Instead of splash's ``data_next`` (the next non-empty block along a grid axis, used by TPU
DMA pipelining), the kernels here loop over compacted lists: for each query block, the indices of
its FULL key blocks, then of its PARTIAL ones, with counts. The loop bound is the count, so empty
blocks cost nothing, not even a predicated iteration. The key-major lists (the transpose) drive the
dk/dv backward kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = np.int32(2**30)


def visible(qp, kp, *, causal, window, qseg=None, kseg=None, qspan=None, kspan=None):
    """Whether keys are visible to queries; all arguments broadcast against each other.

    A key is visible iff kp >= 0, and (not causal, or kp <= qp, or both share a nonzero span id),
    and (window is None or qp - kp < window), and the segment ids are equal.
    """
    ok = kp >= 0
    if causal:
        order = kp <= qp
        if qspan is not None:
            order = order | ((qspan == kspan) & (qspan != 0))
        ok = ok & order
    if window is not None:
        ok = ok & (qp - kp < window)
    if qseg is not None:
        ok = ok & (qseg == kseg)
    return ok


@dataclasses.dataclass(frozen=True)
class MaskKind:
    """The static half of a mask description: which terms the element mask has.

    Attributes:
      causal: keys after the query are hidden (except within a span).
      window: left sliding window W, or None.
      segments: segment ids are present (the arrays carry them after positions).
      spans: span ids are present (after segment ids) and matter (only with causal).
    """

    causal: bool
    window: int | None
    segments: bool
    spans: bool

    def visible(self, q: tuple, kv: tuple):
        """``visible`` for per-token arrays in ``q_arrays`` / ``kv_arrays`` order (broadcasting).

        On a tile: q arrays [bq, 1], kv arrays [1, bk] -> [bq, bk] bool.
        """
        kw = {}
        i = 1
        if self.segments:
            kw.update(qseg=q[i], kseg=kv[i])
            i += 1
        if self.spans:
            kw.update(qspan=q[i], kspan=kv[i])
        return visible(q[0], kv[0], causal=self.causal, window=self.window, **kw)


@dataclasses.dataclass(frozen=True)
class MaskDescription:
    """A mask in O(T + S) memory: per-token arrays plus static causality and window.

    Attributes:
      q_positions: [B, T] absolute query positions.
      kv_positions: [B, S] absolute key positions; negative marks an empty slot.
      causal: keys after the query are hidden (except within a span).
      window: left sliding window W (q_pos - kv_pos < W), or None.
      q_segment_ids, kv_segment_ids: [B, T] / [B, S] packed-document ids, or None.
      q_span_ids, kv_span_ids: [B, T] / [B, S] bidirectional span ids (0: none), or None.
    """

    q_positions: jax.Array
    kv_positions: jax.Array
    causal: bool = True
    window: int | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_span_ids: jax.Array | None = None
    kv_span_ids: jax.Array | None = None

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    @property
    def has_spans(self) -> bool:
        return self.causal and self.q_span_ids is not None

    def q_arrays(self) -> tuple:
        """The per-query arrays the element mask needs: positions[, segments][, spans]."""
        out = [self.q_positions]
        if self.has_segments:
            out.append(self.q_segment_ids)
        if self.has_spans:
            out.append(self.q_span_ids)
        return tuple(out)

    def kv_arrays(self) -> tuple:
        """The per-key arrays the element mask needs, in the order of ``q_arrays``."""
        out = [self.kv_positions]
        if self.has_segments:
            out.append(self.kv_segment_ids)
        if self.has_spans:
            out.append(self.kv_span_ids)
        return tuple(out)

    @property
    def kind(self) -> "MaskKind":
        """The static part of the description (what a kernel closes over)."""
        return MaskKind(self.causal, self.window, self.has_segments, self.has_spans)

    def dense(self) -> jax.Array:
        """The [B, T, S] boolean mask (references and tests only: it materialises T x S)."""
        q = tuple(a[:, :, None] for a in self.q_arrays())
        k = tuple(a[:, None, :] for a in self.kv_arrays())
        shape = self.q_positions.shape + self.kv_positions.shape[1:]
        return jnp.broadcast_to(self.kind.visible(q, k), shape)

    def is_concrete(self) -> bool:
        """True when no mask array is a tracer: block metadata can then be computed in NumPy."""
        arrays = self.q_arrays() + self.kv_arrays()
        return not any(isinstance(a, jax.core.Tracer) for a in arrays)

    def padded(self, t_pad: int, s_pad: int) -> "MaskDescription":
        """Pads queries to t_pad (edge values, so bounds do not widen) and keys to s_pad (empty)."""
        xp = np if self.is_concrete() else jnp

        def pad(a, n, **kw):
            if a is None or a.shape[1] == n:
                return a
            return xp.pad(xp.asarray(a), ((0, 0), (0, n - a.shape[1])), **kw)

        return dataclasses.replace(
            self,
            q_positions=pad(self.q_positions, t_pad, mode="edge"),
            kv_positions=pad(self.kv_positions, s_pad, constant_values=-1),
            q_segment_ids=pad(self.q_segment_ids, t_pad, mode="edge"),
            kv_segment_ids=pad(self.kv_segment_ids, s_pad, mode="edge"),
            q_span_ids=pad(self.q_span_ids, t_pad, mode="edge"),
            kv_span_ids=pad(self.kv_span_ids, s_pad, mode="edge"))


def _bounds(xp, a, block, valid=None):
    """Per-block (min, max) of a [B, L] array over valid entries -> two [B, L / block] arrays."""
    b, n = a.shape
    a = a.reshape(b, n // block, block).astype(np.int32)
    if valid is None:
        return a.min(-1), a.max(-1)
    valid = valid.reshape(b, n // block, block)
    return xp.where(valid, a, _BIG).min(-1), xp.where(valid, a, -_BIG).max(-1)


def classify_blocks(mask: MaskDescription, bq: int, bk: int):
    """Block kinds [B, T/bq, S/bk] int32 (EMPTY, PARTIAL, FULL) of a padded mask description.

    T and S must be multiples of bq and bk (see ``MaskDescription.padded``). Runs in NumPy when
    the description is concrete, else in jnp (a few reductions over O(T + S) data).
    """
    xp = np if mask.is_concrete() else jnp
    qp = xp.asarray(mask.q_positions)
    kp = xp.asarray(mask.kv_positions)
    kvalid = kp >= 0
    qmin, qmax = _bounds(xp, qp, bq)
    kmin, kmax = _bounds(xp, kp, bk, kvalid)
    kv_any = kvalid.reshape(kp.shape[0], -1, bk).any(-1)[:, None, :]
    kv_all = kvalid.reshape(kp.shape[0], -1, bk).all(-1)[:, None, :]
    qmin, qmax = qmin[:, :, None], qmax[:, :, None]  # [B, nq, 1]
    kmin, kmax = kmin[:, None, :], kmax[:, None, :]  # [B, 1, nk]

    empty = ~kv_any
    full = kv_all
    if mask.causal:
        maybe = kmin <= qmax
        if mask.has_spans:
            smin, smax = _bounds(xp, xp.asarray(mask.q_span_ids), bq)
            tmin, tmax = _bounds(xp, xp.asarray(mask.kv_span_ids), bk, kvalid)
            smin, smax = smin[:, :, None], smax[:, :, None]
            tmin, tmax = tmin[:, None, :], tmax[:, None, :]
            # A span can only rescue a block if the id ranges overlap and both hold a nonzero id.
            maybe = maybe | ((smin <= tmax) & (tmin <= smax) & (smax != 0) & (tmax != 0))
        empty = empty | ~maybe
        full = full & (kmax <= qmin)
    if mask.window is not None:
        empty = empty | (qmin - kmax >= mask.window)
        full = full & (qmax - kmin < mask.window)
    if mask.has_segments:
        gmin, gmax = _bounds(xp, xp.asarray(mask.q_segment_ids), bq)
        hmin, hmax = _bounds(xp, xp.asarray(mask.kv_segment_ids), bk, kvalid)
        gmin, gmax = gmin[:, :, None], gmax[:, :, None]
        hmin, hmax = hmin[:, None, :], hmax[:, None, :]
        empty = empty | (gmax < hmin) | (hmax < gmin)
        full = full & (gmin == gmax) & (hmin == hmax) & (gmin == hmin)
    full = full & ~empty
    kinds = xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(np.int32)
    return xp.broadcast_to(kinds, (qp.shape[0], qmin.shape[1], kmin.shape[2]))


@dataclasses.dataclass(frozen=True)
class BlockLists:
    """Compacted block lists along the last axis of a kind table [B, R, C].

    Attributes:
      full: [B, R, C'] int32: indices of FULL blocks first, in order (the rest is filler).
      partial: [B, R, C'] int32: indices of PARTIAL blocks first.
      counts: [B, R, 2] int32: how many FULL, PARTIAL blocks each row has.
    """

    full: jax.Array
    partial: jax.Array
    counts: jax.Array


def block_lists(kinds, pad_to: int | None = None) -> BlockLists:
    """Compacts a kind table [B, R, C] into per-row index lists (see ``BlockLists``).

    Args:
      kinds: block kinds from ``classify_blocks`` (NumPy or jnp).
      pad_to: pad the list axis to this length (Triton blocks must be powers of two).
    """
    xp = np if isinstance(kinds, np.ndarray) else jnp
    c = kinds.shape[-1]

    def compact(kind):
        hit = kinds == kind
        # A stable argsort of "not hit" puts the hit indices first, in increasing order.
        order = xp.argsort(~hit, axis=-1, stable=True).astype(np.int32)
        # Filler entries repeat the last hit (or 0) so that a stray read stays in bounds.
        return order, hit.sum(-1).astype(np.int32)

    full, n_full = compact(FULL)
    part, n_part = compact(PARTIAL)
    counts = xp.stack([n_full, n_part], axis=-1)
    if pad_to is not None and pad_to > c:
        widths = ((0, 0), (0, 0), (0, pad_to - c))
        full, part = xp.pad(full, widths), xp.pad(part, widths)
    return BlockLists(full=full, partial=part, counts=counts)


def transpose_kinds(kinds):
    """[B, nq, nk] -> [B, nk, nq]: key-major kinds for the dk/dv pass."""
    return kinds.transpose(0, 2, 1)


def skipped_fraction(kinds) -> float:
    """Fraction of (query block, key block) pairs that are EMPTY (concrete kinds only)."""
    kinds = np.asarray(kinds)
    return float((kinds == EMPTY).mean()) if kinds.size else 0.0
