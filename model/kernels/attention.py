"""Masked multi-head attention: the single entry point the model calls.

The mask is described, never materialised by callers: absolute positions of queries and keys
(a negative key position marks an empty cache slot), causality, a left sliding window,
segment ids (packed documents never attend across each other) and bidirectional span ids
(tokens of one image see each other in both directions).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Impl = Literal["auto", "pallas", "reference", "xla", "cudnn"]


def check_inputs(q, k, v, q_positions, kv_positions, window, q_segment_ids, kv_segment_ids,
                 q_span_ids, kv_span_ids) -> None:
    """Shape and argument checks shared by every implementation; raise before any tracing."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch or head dim")
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions must be [B, T]={b, t}, got {q_positions.shape}")
    if kv_positions.shape != (b, k.shape[1]):
        raise ValueError(f"kv_positions must be [B, S]={b, k.shape[1]}, got {kv_positions.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for name, ids, shape in (("q_segment_ids", q_segment_ids, (b, t)),
                             ("kv_segment_ids", kv_segment_ids, (b, k.shape[1])),
                             ("q_span_ids", q_span_ids, (b, t)),
                             ("kv_span_ids", kv_span_ids, (b, k.shape[1]))):
        if ids is not None and ids.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {ids.shape}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if (q_span_ids is None) != (kv_span_ids is None):
        raise ValueError("q_span_ids and kv_span_ids must be given together")


def mask_from_description(q_positions, kv_positions, *, causal, window, q_segment_ids,
                          kv_segment_ids, q_span_ids, kv_span_ids) -> jax.Array:
    """The boolean [B, T, S] mask a description stands for (reference path only)."""
    qp = q_positions[:, :, None]  # [B, T, 1]
    kp = kv_positions[:, None, :]  # [B, 1, S]
    allowed = kp >= 0
    if causal:
        order = kp <= qp
        if q_span_ids is not None:
            qs, ks = q_span_ids[:, :, None], kv_span_ids[:, None, :]
            order = order | ((qs == ks) & (qs != 0))
        allowed = allowed & order
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if q_segment_ids is not None:
        allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return allowed


def attention_reference(q, k, v, *, q_positions, kv_positions, causal=True, window=None,
                        q_segment_ids=None, kv_segment_ids=None, q_span_ids=None,
                        kv_span_ids=None, scale=None, soft_cap=None, return_lse=False):
    """Plain-jnp attention in float32; fully masked rows give zeros (and lse = -inf)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, N/K, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    mask = mask_from_description(q_positions, kv_positions, causal=causal, window=window,
                                 q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                 q_span_ids=q_span_ids, kv_span_ids=kv_span_ids)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32))
    out = out.reshape(b, t, n, h).astype(q.dtype)
    if return_lse:
        lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m_safe[..., 0], -jnp.inf)  # [B, K, G, T]
        return out, lse.transpose(0, 3, 1, 2).reshape(b, t, n)
    return out


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    causal: bool = True,
    window: int | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_span_ids: Int[Array, "B T"] | None = None,
    kv_span_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    return_lse: bool = False,
    impl: Impl = "auto",
):
    """Attention of queries over keys under a described mask.

    Args:
      q: queries [B, T, N, H]. k, v: keys and values [B, S, K, H]; N a multiple of K.
      q_positions, kv_positions: absolute positions; kv_positions < 0 marks empty slots.
      causal: a key is visible only at a position <= the query's (except inside a span).
      window: left sliding window W: keys with q_pos - k_pos < W are visible.
      q_segment_ids, kv_segment_ids: packed documents; only equal ids attend.
      q_span_ids, kv_span_ids: nonzero equal ids attend bidirectionally (images).
      scale: softmax scale (default 1/sqrt(H)). soft_cap: tanh cap on logits.
      return_lse: also return the log-sum-exp [B, T, N] in float32.
      impl: ``auto`` | ``pallas`` | ``reference`` | ``xla`` | ``cudnn``.

    Returns:
      [B, T, N, H] in q's dtype (and the lse when asked).
    """
    check_inputs(q, k, v, q_positions, kv_positions, window, q_segment_ids, kv_segment_ids,
                 q_span_ids, kv_span_ids)
    if impl not in ("auto", "pallas", "reference", "xla", "cudnn"):
        raise ValueError(f"impl must be auto, pallas, reference, xla or cudnn; got {impl!r}")
    return attention_reference(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                               causal=causal, window=window, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, q_span_ids=q_span_ids,
                               kv_span_ids=kv_span_ids, scale=scale, soft_cap=soft_cap,
                               return_lse=return_lse)
