"""Pallas bodies of block-sparse flash attention: forward, dq and dk/dv.

GPU-style kernels (one program per query block or key block, an inner loop over the blocks it
pairs with), written so that they run under ``interpret=True`` on CPU and lower through Triton on
GPU. The inner loops walk the compacted lists of ``mask.BlockLists``: first the FULL blocks (no
element mask), then the PARTIAL ones (mask evaluated on the tile); EMPTY blocks are never visited.

Ref layouts (per program, leading batch/head dims squeezed by the BlockSpecs):
  forward / dq: q, do [bq, H]; k, v [S, H]; lse, di [bq]; q mask arrays [bq]; kv mask arrays [S];
    lists [L], counts [2].
  dk/dv: q, do [T, N/K, H] (the query heads of one kv head); lse, di [N/K, T]; k, v [bk, H];
    q mask arrays [T]; kv mask arrays [bk]; lists [L], counts [2].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from model.kernels.mask import MaskKind


def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b in float32 accumulation; full precision for float32 inputs (no TF32 on GPU)."""
    ca = 0 if trans_a else 1
    cb = 1 if trans_b else 0
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _capped(s, soft_cap):
    """(capped logits, tanh term or None): the tanh term gives the cap's derivative 1 - t^2."""
    if soft_cap is None:
        return s, None
    t = jnp.tanh(s / soft_cap)
    return soft_cap * t, t


def _split_refs(refs, n_mask, n_head, n_tail):
    head = refs[:n_head]
    qm = refs[n_head:n_head + n_mask]
    km = refs[n_head + n_mask:n_head + 2 * n_mask]
    rest = refs[n_head + 2 * n_mask:]
    return head, qm, km, rest[:3], rest[3:3 + n_tail]


def _walk(lists, counts_ref, body, carry):
    """Runs body(index, carry, masked) over FULL blocks, then over PARTIAL blocks."""
    full_ref, part_ref = lists
    carry = jax.lax.fori_loop(0, counts_ref[0], lambda j, c: body(full_ref[j], c, False), carry)
    return jax.lax.fori_loop(0, counts_ref[1], lambda j, c: body(part_ref[j], c, True), carry)


def forward_kernel(*refs, kind: MaskKind, n_mask: int, scale: float, soft_cap, bk: int):
    """One query block of one head: online softmax over its listed key blocks."""
    (q_ref, k_ref, v_ref), qm, km, (full_ref, part_ref, cnt_ref), (o_ref, lse_ref) = (
        _split_refs(refs, n_mask, 3, 2))
    q = q_ref[...]  # [bq, H]
    q_tile = tuple(r[...][:, None] for r in qm)
    bq, h = q.shape

    def body(block, carry, masked):
        o, m, l = carry
        start = pl.multiple_of(block * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # [bk, H]
        v = v_ref[pl.ds(start, bk), :]
        s, _ = _capped(_dot(q, k, trans_b=True) * scale, soft_cap)  # [bq, bk]
        if masked:
            kv_tile = tuple(r[pl.ds(start, bk)][None, :] for r in km)
            s = jnp.where(kind.visible(q_tile, kv_tile), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row with nothing visible yet keeps m = -inf; exponentiate against 0 instead (no NaN).
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = alpha * l + p.sum(axis=-1)
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, l

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, m, l = _walk((full_ref, part_ref), cnt_ref, body, init)
    seen = l > 0
    o_ref[...] = (o / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, jnp.log(jnp.where(seen, l, 1.0)) + m, -jnp.inf)


def dq_kernel(*refs, kind: MaskKind, n_mask: int, scale: float, soft_cap, bk: int):
    """dq of one query block of one head, over the same key blocks as the forward pass."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qm, km, (full_ref, part_ref, cnt_ref), (
        dq_ref,) = _split_refs(refs, n_mask, 6, 1)
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]  # [bq]; lse is +inf on rows with no visible key
    q_tile = tuple(r[...][:, None] for r in qm)

    def body(block, dq, masked):
        start = pl.multiple_of(block * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s, t = _capped(_dot(q, k, trans_b=True) * scale, soft_cap)
        p = jnp.exp(s - lse[:, None])  # [bq, bk]
        if masked:
            kv_tile = tuple(r[pl.ds(start, bk)][None, :] for r in km)
            p = jnp.where(kind.visible(q_tile, kv_tile), p, 0.0)
        ds = p * (_dot(do, v, trans_b=True) - di[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _walk((full_ref, part_ref), cnt_ref, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dkv_kernel(*refs, kind: MaskKind, n_mask: int, scale: float, soft_cap, bq: int, groups: int):
    """dk and dv of one key block of one kv head, over the query blocks and heads that see it."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), qm, km, (full_ref, part_ref, cnt_ref), (
        dk_ref, dv_ref) = _split_refs(refs, n_mask, 6, 2)
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    kv_tile = tuple(r[...][None, :] for r in km)

    def body(block, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(block * bq, bq)
        vis = None
        if masked:
            q_tile = tuple(r[pl.ds(start, bq)][:, None] for r in qm)
            vis = kind.visible(q_tile, kv_tile)  # [bq, bk]
        # The G query heads sharing this kv head: a static loop, so dk/dv never need a G-sum.
        for g in range(groups):
            q = q_ref[pl.ds(start, bq), g, :]  # [bq, H]
            do = do_ref[pl.ds(start, bq), g, :]
            lse = lse_ref[g, pl.ds(start, bq)]
            di = di_ref[g, pl.ds(start, bq)]
            s, t = _capped(_dot(q, k, trans_b=True) * scale, soft_cap)
            p = jnp.exp(s - lse[:, None])
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, v, trans_b=True) - di[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _walk((full_ref, part_ref), cnt_ref, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
