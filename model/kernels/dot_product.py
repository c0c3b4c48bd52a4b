"""The ``xla`` and ``cudnn`` backends: ``jax.nn.dot_product_attention`` on a described mask.

These are the peers the Pallas kernels are measured against. ``jax.nn.dot_product_attention``
takes only a dense mask (or ``is_causal`` plus ``local_window_size``), so the mask is materialised
here unless it is plain causal/windowed attention at static default positions, which cuDNN runs
natively. Neither implementation has a logit soft cap or returns the log-sum-exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.kernels.mask import MaskDescription


def _is_default_layout(mask: MaskDescription) -> bool:
    """Static positions 0..S-1 for keys and the last T of them for queries, no ids."""
    if not mask.is_concrete() or mask.has_segments or mask.q_span_ids is not None:
        return False
    qp, kp = np.asarray(mask.q_positions), np.asarray(mask.kv_positions)
    s, t = kp.shape[1], qp.shape[1]
    return bool((kp == np.arange(s)).all() and (qp == np.arange(s - t, s)).all())


def dot_product_attention(q, k, v, mask: MaskDescription, *, scale: float, soft_cap,
                          return_lse: bool, implementation: str):
    """Attention through ``jax.nn.dot_product_attention(implementation=...)``.

    Args:
      q: [B, T, N, H]. k, v: [B, S, K, H].
      mask: the mask description.
      scale: logit scale. soft_cap, return_lse: must be None / False (not supported).
      implementation: ``xla`` or ``cudnn``.

    Returns:
      [B, T, N, H] in q's dtype; rows that see no key are zeros, as in the reference.
    """
    if soft_cap is not None:
        raise ValueError(f"impl={implementation!r} has no logit soft cap; use pallas or reference")
    if return_lse:
        raise ValueError(f"impl={implementation!r} cannot return the lse; use pallas or reference")
    kw = dict(scale=scale, implementation=implementation)
    if _is_default_layout(mask) and q.shape[1] == k.shape[1]:
        window = None if mask.window is None else (mask.window - 1, 0 if mask.causal else None)
        if window is not None and window[1] is None:
            window = None  # a two-sided window is not this mask; fall through to a dense mask
        else:
            return jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal,
                                                local_window_size=window, **kw)
    dense = mask.dense()  # [B, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=dense[:, None], **kw)
    # A fully masked row would average all values; the reference (and the kernels) give zeros.
    return jnp.where(dense.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
