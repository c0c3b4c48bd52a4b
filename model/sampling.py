"""Token sampling on device: greedy, temperature, top-k, top-p and min-p, per row.

Every parameter is an array over the batch so one compiled function serves mixed requests;
a temperature of 0 means greedy for that row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


# The cuts are read off the row's FAST_K best probabilities when they lie among them.
FAST_K = 64


def filter_logits(logits: Float[Array, "B V"], *, top_k: Int[Array, "B"], top_p: Float[Array, "B"],
                  min_p: Float[Array, "B"]) -> Float[Array, "B V"]:
    """Masks (to -inf) the tokens outside each row's top-k, nucleus and min-p sets.

    top_k <= 0, top_p >= 1 and min_p <= 0 switch the respective filter off. Each filter keeps
    the row's best tokens down to a probability cut: top-k the k-th largest probability, the
    nucleus the largest cut whose kept mass still reaches top_p (so the token crossing the
    threshold stays), min-p ``min_p * p_max``; together they keep what clears the highest cut
    (tokens tied with it stay, as in transformers' top-k).

    No full sort: on XLA:CPU sorting a batch of 8 rows of 49,152 logits took ~80 ms (the two
    argsorts of the sorted formulation ~180 ms), as long as SmolLM2's whole decode step. When
    every row's top-k / nucleus cut lies among its ``FAST_K`` best tokens (``lax.top_k``, a
    partial sort) the cut is read off those; otherwise it is found by bisection on the
    probability, 40 halvings of [0, p_max] (far below float32's resolution where probabilities
    matter), each a compare and two sums over the row: ~7 ms for 8 rows, ~23 ms for 32.
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    p_max = jnp.max(probs, axis=-1, keepdims=True)
    top_k, top_p = top_k[:, None], top_p[:, None]
    by_k, by_p = top_k > 0, top_p < 1.0
    k = min(FAST_K, probs.shape[-1])
    best = jax.lax.top_k(probs, k)[0]  # [B, k], best first
    fits = ~(by_k | by_p) | (by_k & (top_k <= k)) | (by_p & (jnp.sum(best, -1, keepdims=True) >= top_p))

    def from_best():
        # Each filter keeps a prefix of the sorted row; the shortest ends inside the k best.
        rank = jnp.arange(k)[None, :]
        mass_before = jnp.cumsum(best, -1) - best
        keep = jnp.where(by_k, rank < top_k, True) & jnp.where(by_p, mass_before < top_p, True)
        n = jnp.maximum(jnp.sum(keep, -1, keepdims=True), 1)
        cut = jnp.take_along_axis(best, n - 1, axis=-1)
        return jnp.where(by_k | by_p, cut, 0.0)

    def by_bisection():
        def halve(_, bounds):
            # lo always satisfies "cut at or below a filter's own cut" for some active filter
            # (or for none active: 0 keeps everything); hi never does.
            lo, hi = bounds
            mid = (lo + hi) / 2
            kept = probs >= mid
            count = jnp.sum(kept, axis=-1, keepdims=True)
            mass = jnp.sum(jnp.where(kept, probs, 0.0), axis=-1, keepdims=True)
            ok = (by_k & (count >= top_k)) | (by_p & (mass >= top_p))
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        return jax.lax.fori_loop(0, 40, halve, (jnp.zeros_like(p_max), p_max * 2.0))[0]

    lo = jax.lax.cond(jnp.all(fits), from_best, by_bisection)
    cut = jnp.minimum(jnp.maximum(lo, min_p[:, None] * p_max), p_max)  # the best token always stays
    return jnp.where(probs >= cut, logits, -jnp.inf)


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
