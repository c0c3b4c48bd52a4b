"""Masked multi-head attention: the single entry point the model calls.

The mask is described, never materialised by callers: absolute positions of queries and keys
(a negative key position marks an empty cache slot), causality, a left sliding window,
segment ids (packed documents never attend across each other) and bidirectional span ids
(tokens of one image see each other in both directions).

Backends (``impl``): ``reference`` is the plain-jnp computation below (it materialises the mask);
``pallas`` is Kestrel's block-sparse flash attention (model/kernels/flash.py: Triton on GPU,
interpret mode on CPU; splash attention on TPU where the mask fits, model/kernels/tpu_splash.py);
``xla`` and ``cudnn`` are ``jax.nn.dot_product_attention`` (model/kernels/dot_product.py), the
peers the kernels are measured against; ``auto`` is the reference on CPU and ``pallas`` elsewhere.
Every backend runs ``check_inputs`` first, so bad shapes raise ``ValueError`` before any tracing.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from model.kernels.dot_product import dot_product_attention
from model.kernels.flash import flash_attention
from model.kernels.mask import MaskDescription
from model.kernels.tpu_splash import splash_attention, splash_fits

HIGHEST = jax.lax.Precision.HIGHEST

Impl = Literal["auto", "pallas", "reference", "xla", "cudnn", "grouped"]


def check_inputs(q, k, v, q_positions, kv_positions, window, q_segment_ids, kv_segment_ids,
                 q_span_ids, kv_span_ids) -> None:
    """Shape and argument checks shared by every implementation; raise before any tracing."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H]; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
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
    return MaskDescription(q_positions, kv_positions, causal, window, q_segment_ids,
                           kv_segment_ids, q_span_ids, kv_span_ids).dense()


def attention_reference(q, k, v, *, q_positions, kv_positions, causal=True, window=None,
                        q_segment_ids=None, kv_segment_ids=None, q_span_ids=None,
                        kv_span_ids=None, scale=None, soft_cap=None, return_lse=False):
    """Plain-jnp attention in float32; fully masked rows give zeros (and lse = -inf).

    The oracle of every kernel test, so its products run at full float32 precision: XLA:GPU's
    default for a float32 dot is TF32 (~1e-3 error, seen on an H200), the kernels' is IEEE.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, N/K, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision=HIGHEST) * scale
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
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32),
                     precision=HIGHEST)
    out = out.reshape(b, t, n, h).astype(q.dtype)
    if return_lse:
        # [B, K, G, T]
        lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m_safe[..., 0], -jnp.inf)
        return out, lse.transpose(0, 3, 1, 2).reshape(b, t, n)
    return out


def default_positions(b: int, t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions when the caller gives none: keys 0..S-1, queries the last T of them (NumPy, so
    block metadata is computed at trace time: the static fast path)."""
    kv = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    q = np.broadcast_to(np.arange(s - t, s, dtype=np.int32), (b, t))
    return q, kv


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation ``impl`` means on ``platform`` (default: JAX's default backend).

    ``auto`` is the reference on CPU (interpret mode is for tests, not speed) and the Pallas
    kernels on GPU and TPU.
    """
    if impl not in ("auto", "pallas", "reference", "xla", "cudnn", "grouped"):
        raise ValueError(f"impl must be auto, pallas, reference, xla, cudnn or grouped; got {impl!r}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        return "reference" if platform == "cpu" else "pallas"
    return impl


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    q_span_ids: Int[Array, "B T"] | None = None,
    kv_span_ids: Int[Array, "B S"] | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    return_lse: bool = False,
    keys_in_query_order: bool = False,
    impl: Impl = "auto",
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
):
    """Attention of queries over keys under a described mask.

    Args:
      q: queries [B, T, N, H]. k, v: keys and values [B, S, K, H]; N a multiple of K.
      q_positions, kv_positions: absolute positions; kv_positions < 0 marks empty slots. Both
        None (training): keys at 0..S-1 and queries at the last T positions, known statically,
        so the Pallas path computes its block metadata at trace time.
      causal: a key is visible only at a position <= the query's (except inside a span).
      window: left sliding window W: keys with q_pos - k_pos < W are visible.
      q_segment_ids, kv_segment_ids: packed documents; only equal ids attend.
      q_span_ids, kv_span_ids: nonzero equal ids attend bidirectionally (images).
      scale: softmax scale (default 1/sqrt(H)). soft_cap: tanh cap on logits.
      return_lse: also return the log-sum-exp [B, T, N] in float32.
      keys_in_query_order: the caller's word that k and v are the queries' own sequence (T = S)
        with positions ascending along each segment, so a key after a query (by index) is hidden
        from it (packed training batches). ``grouped`` then skips, at trace time, the keys each
        chunk of queries cannot see, as it does for static positions.
      impl: ``auto`` | ``pallas`` | ``reference`` | ``xla`` | ``cudnn`` | ``grouped`` (see
        ``resolve_impl``). ``grouped`` is plain jnp laid out kv-head-major (``grouped.py``): on
        XLA:CPU a packed 4 x 1,024 training batch's attention, forward and backward, took 0.8x
        the time of ``xla`` and 0.31x the reference's.
        ``pallas`` runs the block-sparse kernels (model/kernels/flash.py), in interpret mode on
        CPU; on TPU, masks that splash attention can express go to splash attention and the
        others to the reference.
      block_q, block_k: Pallas block sizes (powers of two; capped by T and S).
      interpret: force Pallas interpret mode on or off (default: on exactly on CPU).

    Returns:
      [B, T, N, H] in q's dtype (and the lse when asked).
    """
    b, t = q.shape[:2] if q.ndim == 4 else (0, 0)
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("q_positions and kv_positions must be given together (or both omitted)")
    if q_positions is None:
        if k.ndim != 4:
            raise ValueError(f"k must be [B, S, K, H], got shape {k.shape}")
        q_positions, kv_positions = default_positions(b, t, k.shape[1])
    check_inputs(q, k, v, q_positions, kv_positions, window, q_segment_ids, kv_segment_ids,
                 q_span_ids, kv_span_ids)
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    impl = resolve_impl(impl)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = MaskDescription(q_positions, kv_positions, causal, window, q_segment_ids,
                           kv_segment_ids, q_span_ids, kv_span_ids)
    reference = lambda: attention_reference(  # noqa: E731
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_span_ids=q_span_ids,
        kv_span_ids=kv_span_ids, scale=scale, soft_cap=soft_cap, return_lse=return_lse)
    if impl == "reference":
        return reference()
    if impl == "grouped" and not return_lse:
        # Plain jnp, kv-head-major, softmax normalised after the value product
        # (model/kernels/grouped.py); imported here because that module imports this one.
        from model.kernels.grouped import chunked_grouped_attention, key_ranges

        ranges = key_ranges(mask, t, k.shape[1], keys_in_query_order=keys_in_query_order)
        return chunked_grouped_attention(q, k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3), mask,
                                         ranges, scale=scale, soft_cap=soft_cap)
    if impl == "grouped":  # the lse: the reference's
        return reference()
    if impl in ("xla", "cudnn"):
        return dot_product_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap,
                                     return_lse=return_lse, implementation=impl)
    platform = jax.default_backend()
    if platform == "tpu":
        # Kestrel's kernels are GPU-style (Triton / interpret); on TPU, masks splash attention
        # can express go to splash, the rest (runtime positions, spans, lse) to the reference.
        if not return_lse and splash_fits(mask, q.shape, k.shape, soft_cap):
            return splash_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap,
                                    interpret=bool(interpret))
        if not interpret:
            return reference()
    h = q.shape[-1]
    if kernel_head_dim(h) != h:
        # Triton tiles must be powers of two (>= 16 for its dot): zero columns leave q.k and the
        # softmax unchanged, and the output's extra columns (zero values) are cut off.
        pad = [(0, 0)] * 3 + [(0, kernel_head_dim(h) - h)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    out, lse = flash_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap, block_q=block_q,
                               block_k=block_k,
                               interpret=platform == "cpu" if interpret is None else interpret)
    out = out[..., :h]
    return (out, lse) if return_lse else out


def kernel_head_dim(h: int) -> int:
    """The head width the Pallas GPU kernels run: h rounded up to a power of two, at least 16."""
    return max(16, 1 << (h - 1).bit_length())
