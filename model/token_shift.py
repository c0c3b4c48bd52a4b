"""Token shift: each position's input also carries the previous token's embedding, mapped into a
subspace of its own by a learned D x D matrix (RWKV's token shift; the embedding "smear" of fast
small-model training runs).

Why: copying text from the context (numbers into a tool call, a tool's result into the answer)
needs an induction circuit: a head that finds where the current token occurred before and reads
the token after it. A plain transformer builds it from two heads in two layers (a previous-token
head whose output a second head's keys read), and neither gets a gradient until the other
exists, so training sits on a plateau first. With the previous token already in the residual
stream, one head copies: its query (the current token) matches the key of the position whose
*previous* token it is, whose value is the token to emit. On the repeated-segment copy task a
2-layer width-128 model learnt this in ~250 steps with the shift and not in 600 without it.

The mix is its own matrix (orthogonal at init), not the embedding itself, so the previous token
lives apart from the current one and a query can tell "was before me" from "is me".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from model.config import ModelConfig
from model.layers import DTYPES
from model.quantization import linear, read_weight

NO_PREVIOUS = -1  # a prev-token id meaning "nothing before this token" (a sequence's start)


def previous_tokens(tokens: Int[Array, "B T"], *, positions: Int[Array, "B T"] | None = None,
                    segment_ids: Int[Array, "B T"] | None = None) -> Int[Array, "B T"]:
    """The token before each of ``tokens`` within its row, ``NO_PREVIOUS`` at a row's start, at a
    packed segment's start (``segment_ids`` changes) and at position 0."""
    prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=NO_PREVIOUS)
    if segment_ids is not None:
        starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)),
                         constant_values=True)
        prev = jnp.where(starts, NO_PREVIOUS, prev)
    if positions is not None:
        prev = jnp.where(positions <= 0, NO_PREVIOUS, prev)
    return prev


class TokenShift(nnx.Module):
    """``x_t + e(prev_t) @ mix``: the previous token's embedding in its own learned subspace."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        init = jax.nn.initializers.orthogonal()(rngs.params(), (d, d), jnp.float32)
        self.mix = nnx.Param(init.astype(DTYPES[cfg.param_dtype]), logical_axes=("embed", None))
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, x: Float[Array, "B T D"], prev_embeddings: Float[Array, "B T D"],
                 prev_tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """Adds the mapped previous-token embeddings to x where a previous token exists."""
        shifted = linear("BTD,DE->BTE", prev_embeddings, read_weight(self.mix), dtype=self.dtype)
        return x + jnp.where((prev_tokens >= 0)[..., None], shifted, 0).astype(x.dtype)
