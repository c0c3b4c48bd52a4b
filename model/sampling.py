"""Token sampling on device: greedy, temperature, top-k, top-p and min-p, per row.

Every parameter is an array over the batch so one compiled function serves mixed requests;
a temperature of 0 means greedy for that row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def filter_logits(logits: Float[Array, "B V"], *, top_k: Int[Array, "B"], top_p: Float[Array, "B"],
                  min_p: Float[Array, "B"]) -> Float[Array, "B V"]:
    """Masks (to -inf) the tokens outside each row's top-k, nucleus and min-p sets.

    top_k <= 0, top_p >= 1 and min_p <= 0 switch the respective filter off.
    """
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)  # [B, V], best first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = jnp.where(top_k[:, None] > 0, rank < top_k[:, None], True)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    sorted_masked = jnp.where(keep, sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(sorted_masked, inverse, axis=-1)


def sample(logits: Float[Array, "B V"], key: Array, *, temperature: Float[Array, "B"],
           top_k: Int[Array, "B"], top_p: Float[Array, "B"], min_p: Float[Array, "B"]
           ) -> Int[Array, "B"]:
    """One token per row; rows with temperature 0 take the argmax."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = filter_logits(scaled, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
