"""Rotary position embeddings with the scalings of the families we convert.

Frequencies follow transformers' ``ROPE_INIT_FUNCTIONS`` exactly (default, linear, llama3, yarn),
and rotation uses the rotate-half layout, so converted checkpoints need no permutation beyond
undoing llama.cpp's GGUF interleave.
"""

from __future__ import annotations

import math

import numpy as np
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling,
                        max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [H/2] float32, attention_factor applied to cos and sin)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    pos_freqs = np.float32(theta) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if scaling.type == "default":
        return inv_freq, 1.0
    if scaling.type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.type == "llama3":
        old_context = scaling.original_max_position_embeddings
        low_wavelen = old_context / scaling.low_freq_factor
        high_wavelen = old_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.beta_fast or 32
    beta_slow = scaling.beta_slow or 1

    def correction_dim(rotations):
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (factor * pos_freqs)
    inv = interpolated * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def rope_tables(positions: Int[Array, "B T"], inv_freq: np.ndarray, attention_factor: float
                ) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin tables [B, T, H] in float32 for the given absolute positions."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: Float[Array, "B T N H"], cos: Float[Array, "B T H"],
               sin: Float[Array, "B T H"]) -> Float[Array, "B T N H"]:
    """Rotates x by position (rotate-half layout), computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
