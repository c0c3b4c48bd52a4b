"""A pointer: the next-token distribution mixed with a copy distribution over the context.

    p(x_{t+1}) = (1 - g_t) softmax(logits_t) + g_t copy_t,   g_t = sigmoid(w . h_t + b)

``copy_t`` is an attention of position t over the earlier positions j < t of its own sequence
(queries ``W_q h_t``, keys ``W_k h_j`` of the final hidden states), each weight put on the token
``x_{j+1}`` that followed j: query and key are both "the context before a token", so an earlier
context like the present one proposes what came after it (induction), and the model names a token
by where it sits instead of by its output embedding (the pointer-generator of See et al. 2017;
Merity et al.'s pointer sentinel). Why Kestrel has it:
a small model trained on synthetic tool use has to copy words it has never written (the names of
functions it was never shown), and the output embeddings of such rare tokens stay close to their
initialisation however well an attention head finds them: in a 400-step proxy pair of
kestrel-nano, copyable tokens that training emits under 10 times were 61% right with a pointer and
0% without (``bench/results/nano_tokenizer_study.json``).

Each position's pointer key and its own token id are all that later positions need (the token
after j is the id cached at j + 1), so they are cached per position like one more layer's K and V
(``model/kv_cache.py``, ``model/paged_cache.py``), and a prefix-cache page is still a function of
its tokens alone. The output is a log-probability, which the samplers and losses take as logits
(softmax of a log-probability is itself); a z-loss on it is therefore 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from model.config import ModelConfig
from model.layers import param

# Initial gate bias: sigmoid(-2) = 0.12, so a fresh model mostly generates and learns when to copy.
GATE_BIAS = -2.0


class Pointer(nnx.Module):
    """The pointer's query and key projections and its gate (float parameters, never quantized)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.pointer_dim
        self.query = param(rngs, (d, p), ("embed", None), cfg.param_dtype, std=d ** -0.5)
        self.key = param(rngs, (d, p), ("embed", None), cfg.param_dtype, std=d ** -0.5)
        self.gate = param(rngs, (d,), ("embed",), cfg.param_dtype, init="zeros")
        self.gate_bias = nnx.Param(jnp.full((), GATE_BIAS, jnp.float32))

    def keys(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T P"]:
        """The pointer keys of final hidden states (float32), to attend over now or to cache."""
        return hidden.astype(jnp.float32) @ self.key[...].astype(jnp.float32)

    def mix(self, logits: Float[Array, "B T V"], hidden: Float[Array, "B T D"],
            keys: Float[Array, "B S P"], token_ids: Int[Array, "B S"],
            allowed: Bool[Array, "B T S"]) -> Float[Array, "B T V"]:
        """log((1 - g) softmax(logits) + g copy) at the query positions of ``hidden``.

        Args:
          logits: the generator's logits at the query positions.
          hidden: the final hidden states at the query positions.
          keys: the context's pointer keys (``keys``), one per context position.
          token_ids: the token that followed each context position (``next_tokens``); ids
            outside the vocabulary (none yet, padding, an image placeholder) are never copied.
          allowed: which context positions each query may copy from (its own sequence, j < t).
            A query with none left (a sequence's first token) copies nothing (g = 0).

        Returns:
          Log-probabilities [B, T, V] (float32).
        """
        vocab = logits.shape[-1]
        h = hidden.astype(jnp.float32)
        queries = h @ self.query[...].astype(jnp.float32)
        allowed = allowed & ((token_ids >= 0) & (token_ids < vocab))[:, None, :]
        scores = jnp.einsum("btp,bsp->bts", queries, keys) * queries.shape[-1] ** -0.5
        # A finite fill: a row with nothing allowed stays finite (uniform, then zeroed), and so
        # does its gradient.
        weights = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
        weights = jnp.where(allowed, weights, 0.0)
        copy = copy_distribution(weights, token_ids, vocab)
        z = h @ self.gate[...].astype(jnp.float32) + self.gate_bias[...]
        any_allowed = jnp.any(allowed, axis=-1)
        log_gen = jnp.where(any_allowed, jax.nn.log_sigmoid(-z), 0.0)[..., None]
        log_copy = jnp.where(any_allowed, jax.nn.log_sigmoid(z), -jnp.inf)[..., None]
        # Only the ids in the context have copy mass: everywhere else the output is log(1 - g) +
        # log p, so the mixture's logaddexp runs on [B, T, S] context ids, not on [B, T, V] (on a
        # CPU the vocabulary-wide passes had cost the engine a quarter of its decode rate).
        out = log_gen + jax.nn.log_softmax(logits, axis=-1)
        row_ids = jnp.clip(token_ids, 0, vocab - 1)  # [B, S]
        ids = jnp.broadcast_to(row_ids[:, None, :], weights.shape)
        mass = jnp.take_along_axis(copy, ids, axis=-1)  # each context id's total copy mass
        # log(mass) where mass > 0; the floor keeps the gradient finite where it is 0.
        log_mass = jnp.where(mass > 0, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)
        before = jnp.take_along_axis(out, ids, axis=-1)
        mixed = jnp.logaddexp(before, log_copy + log_mass)
        # An id found at n positions gets n equal corrections: add each / n (a scatter-set would
        # pass the id's whole gradient to every one of them).
        b = row_ids.shape[0]
        counts = jnp.zeros((b, vocab), jnp.float32).at[jnp.arange(b)[:, None], row_ids].add(1.0)
        per_position = (mixed - before) / jnp.take_along_axis(counts, row_ids, axis=-1)[:, None, :]
        rows = jnp.arange(b)[:, None, None]
        queries = jnp.arange(ids.shape[1])[None, :, None]
        return out.at[rows, queries, ids].add(per_position)


def copy_distribution(weights: Float[Array, "B T S"], token_ids: Int[Array, "B S"],
                      vocab: int) -> Float[Array, "B T V"]:
    """Each query's attention weights summed per token id: a scatter-add (on a CPU, forward and
    backward at [2, 1024, 1024] onto 2,048 ids, 2.3x faster than a one-hot matmul, and it never
    holds a [S, V] one-hot, which at a long context would not fit)."""
    b, t, s = weights.shape
    rows = jnp.arange(b)[:, None, None]
    queries = jnp.arange(t)[None, :, None]
    ids = jnp.clip(token_ids, 0, vocab - 1)[:, None, :]  # disallowed ids carry weight 0
    return jnp.zeros((b, t, vocab), jnp.float32).at[rows, queries, ids].add(weights)


def tokens_beside(token_ids: Int[Array, "B S"]) -> Int[Array, "B S"]:
    """The token in the next slot of each row (-1 after the last): the token after each position
    where a row holds its sequence's positions in order (a packed training row, gathered pages)."""
    return jnp.concatenate([token_ids[:, 1:], jnp.full_like(token_ids[:, :1], -1)], axis=1)


def next_tokens(token_ids: Int[Array, "B S"], positions: Int[Array, "B S"]) -> Int[Array, "B S"]:
    """The token at position ``p + 1`` for each slot of position ``p`` in the same row (-1: none
    there yet). Rows hold positions below their length ``S`` (the dense cache's slots: a padded
    prompt, then the decoded tokens), looked up by position, so slots need not be in order."""
    b, s = token_ids.shape
    rows = jnp.arange(b)[:, None]
    by_position = jnp.full((b, s + 1), -1, token_ids.dtype).at[  # padding: out of range, dropped
        rows, jnp.where(positions >= 0, positions, s + 1)].set(token_ids, mode="drop")
    return jnp.take_along_axis(by_position, jnp.clip(positions + 1, 0, s), axis=1)


def allowed_positions(q_positions: Int[Array, "B T"], kv_positions: Int[Array, "B S"],
                      q_segment_ids: Int[Array, "B T"] | None = None,
                      kv_segment_ids: Int[Array, "B S"] | None = None) -> Bool[Array, "B T S"]:
    """Context positions each query may copy from: its own (segment's) positions before itself
    (whose next token it has seen); negative positions are padding on either side."""
    ok = ((kv_positions[:, None, :] < q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0)
          & (q_positions[:, :, None] >= 0))
    if q_segment_ids is not None:
        ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return ok
