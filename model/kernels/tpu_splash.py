"""The TPU route: masks that JAX's splash attention can express go to splash attention.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is the tuned TPU kernel for
block-sparse masks, but its masks are static (lazy NumPy-style masks, a traced one raises
ConcretizationTypeError). So it takes only calls at the static default layout (no positions given:
queries and keys at 0..T-1), causal or not, with or without a window and segment ids; runtime
positions (cached decoding) and span ids stay on Kestrel's own kernel.
"""

from __future__ import annotations

import jax
import numpy as np

from model.kernels.mask import MaskDescription

_BLOCK = 128  # splash's default block size; sequences must be multiples of it


def splash_fits(mask: MaskDescription, q_shape, k_shape, soft_cap) -> bool:
    """Whether splash attention computes exactly this call."""
    del soft_cap  # splash has attn_logits_soft_cap
    t, s = q_shape[1], k_shape[1]
    if t != s or t % _BLOCK or mask.q_span_ids is not None or not mask.is_concrete():
        return False
    qp, kp = np.asarray(mask.q_positions), np.asarray(mask.kv_positions)
    return bool((qp == np.arange(t)).all() and (kp == np.arange(s)).all())


def splash_attention(q, k, v, mask: MaskDescription, *, scale: float, soft_cap,
                     interpret: bool = False):
    """Splash attention on [B, T, N, H] / [B, S, K, H] inputs (``splash_fits`` must hold)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q.shape
    s = k.shape[1]
    if mask.window is not None:
        head_mask = splash.LocalMask((t, s), (mask.window - 1, 0 if mask.causal else None), 0)
    elif mask.causal:
        head_mask = splash.CausalMask((t, s))
    else:
        head_mask = splash.FullMask((t, s))
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * n), head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=soft_cap, interpret=interpret)
    # Splash is unbatched, [heads, length, head_dim], and does not scale q itself.
    qt = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if mask.has_segments:
        ids = splash.SegmentIds(q=mask.q_segment_ids, kv=mask.kv_segment_ids)
        out = jax.vmap(lambda q_, k_, v_, i_: kernel(q_, k_, v_, segment_ids=i_))(qt, kt, vt, ids)
    else:
        out = jax.vmap(kernel)(qt, kt, vt)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
