"""Verification of draft tokens on device: greedy exactness and rejection sampling.

A speculative step feeds a request its last token plus k draft tokens d_1..d_k and gets the
target's logits at the k + 1 positions. Position j's distribution p_j is the one the target would
sample its token from after the first j drafts (the request's temperature / top-k / top-p /
min-p and channel mask applied, exactly as ``serve.runner.sample_tokens`` does for one token).

- Greedy rows accept drafts while ``d_{j+1} == argmax p_j`` and then take ``argmax p_a``: the
  tokens are exactly those of plain greedy decoding.
- Sampling rows use standard speculative rejection sampling (Leviathan et al. 2023; Chen et al.
  2023): accept ``d_{j+1}`` with probability ``min(1, p_j(d) / q_j(d))``, where ``q_j`` is the
  distribution the draft was drawn from (one-hot for deterministic drafts such as prompt lookup);
  at the first rejection draw from ``norm(max(0, p_j - q_j))``; after k acceptances draw the bonus
  token from ``p_k``. Every emitted token is then distributed exactly as under plain sampling.

Random numbers come from ``fold_in(key(seed), output index)`` like the plain sampler, with
distinct salts for the acceptance test and the residual draw, so a seeded request is reproducible.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from model.sampling import filter_logits

_ACCEPT_SALT, _RESIDUAL_SALT = 0x5EC1, 0x5EC2


def unpack_mask(words: jax.Array, vocab: int) -> jax.Array:
    """int32[B, ceil(V/32)] bitmask -> bool[B, V] (bit t % 32 of word t // 32)."""
    v = jnp.arange(vocab)
    return ((words[:, v // 32] >> (v % 32)) & 1).astype(bool)


def processed_logits(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """[B, T, V] masked logits -> temperature-scaled logits with top-k/p and min-p applied
    (-inf outside), exactly what ``serve.runner.sample_tokens`` draws from [B, T, V]."""
    b, t, vocab = x.shape
    rep = lambda a: jnp.repeat(a, t)  # noqa: E731  per-row parameters for every position
    scaled = x / jnp.maximum(p["temperature"], 1e-6)[:, None, None]
    filtered = filter_logits(scaled.reshape(b * t, vocab), top_k=rep(p["top_k"]),
                             top_p=rep(p["top_p"]), min_p=rep(p["min_p"]))
    return filtered.reshape(b, t, vocab)


def processed_probs(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """[B, T, V] masked logits -> the sampling distribution (temperature, top-k/p, min-p) [B, T, V]."""
    return jax.nn.softmax(processed_logits(x, p), axis=-1)


def verify_drafts(logits, drafts, num_drafts, p: Mapping[str, jax.Array], *, sampling: bool,
                  masked: bool, draft_probs=None):
    """Accepts the longest valid prefix of each row's drafts plus one target token.

    Args:
      logits: [B, T, V] float32 target logits; position j follows the fed token and j drafts.
      drafts: [B, T - 1] int32 draft tokens (entries at or past ``num_drafts`` are ignored).
      num_drafts: [B] int32 drafts per row (<= T - 1). A row with none is a plain decode riding
        along in the pass: it draws its token exactly as ``serve.runner.sample_tokens`` would
        (same key, same logits), so batching it with drafted rows changes nothing.
      p: per-row sampling arrays as ``serve.runner.sample_tokens`` takes them: temperature, top_k,
        top_p, min_p, seed, out_index [B]; with ``masked`` also mask int32[B, ceil(V/32)] (one
        mask for every position: the engine verifies only where the channel mask stays fixed).
      sampling: some row has temperature > 0 (static).
      masked: apply ``p["mask"]`` (static).
      draft_probs: [B, T - 1, V] the distributions the drafts were sampled from, or None for
        deterministic drafts (one-hot q).

    Returns:
      (tokens [B, T] int32, num_accepted [B] int32): row b emits ``tokens[b, :num_accepted + 1]``,
      the accepted drafts followed by the correction (or bonus) token.
    """
    b, t, vocab = logits.shape
    x = logits
    if masked:
        x = jnp.where(unpack_mask(p["mask"], vocab)[:, None, :], x, -jnp.inf)
    j = jnp.arange(t - 1)[None, :]
    valid = j < num_drafts[:, None]  # [B, T-1]
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [B, T]
    n_greedy = jnp.cumprod(valid & (drafts == greedy[:, :-1]), axis=1).sum(axis=1).astype(jnp.int32)
    if not sampling:
        return greedy, n_greedy
    filtered = processed_logits(x, p)  # [B, T, V]
    probs = jax.nn.softmax(filtered, axis=-1)
    base = jax.vmap(lambda s, i: jax.vmap(lambda o: jax.random.fold_in(jax.random.key(s), o))(
        i + jnp.arange(t)))(p["seed"], p["out_index"])  # [B, T] keys
    salted = lambda salt: jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, salt)))(base)  # noqa: E731
    safe = jnp.where(valid, drafts, 0)
    p_draft = jnp.take_along_axis(probs[:, :-1], safe[..., None], axis=-1)[..., 0]  # [B, T-1]
    if draft_probs is None:
        q_draft = jnp.ones_like(p_draft)
        q = jax.nn.one_hot(safe, vocab, dtype=probs.dtype)
    else:
        q_draft = jnp.take_along_axis(draft_probs, safe[..., None], axis=-1)[..., 0]
        q = draft_probs
    u = jax.vmap(jax.vmap(jax.random.uniform))(salted(_ACCEPT_SALT)[:, :-1])  # [B, T-1]
    accept = valid & (u * q_draft < p_draft)  # u < p/q without dividing by a tiny q
    n_sampled = jnp.cumprod(accept, axis=1).sum(axis=1).astype(jnp.int32)
    q_full = jnp.concatenate([jnp.where(valid[..., None], q, 0.0), jnp.zeros((b, 1, vocab), q.dtype)], 1)
    residual = jnp.maximum(probs - q_full, 0.0)  # [B, T, V]; at the bonus position q = 0: p itself
    mass = residual.sum(-1, keepdims=True)
    residual = jnp.where(mass > 0, residual, probs)  # p == q exactly: rejection cannot happen
    drawn = jax.vmap(jax.vmap(lambda k, r: jax.random.categorical(k, jnp.log(r))))(
        salted(_RESIDUAL_SALT), residual).astype(jnp.int32)  # [B, T]
    correction = jnp.take_along_axis(drawn, n_sampled[:, None], axis=1)  # [B, 1]
    plain_keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(p["seed"], p["out_index"])
    plain = jax.vmap(jax.random.categorical)(plain_keys, filtered[:, 0]).astype(jnp.int32)  # [B]
    correction = jnp.where(num_drafts[:, None] == 0, plain[:, None], correction)
    padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    pos = jnp.arange(t)[None, :]
    sampled = jnp.where(pos < n_sampled[:, None], padded, correction)
    hot = p["temperature"] > 0
    return (jnp.where(hot[:, None], sampled, greedy),
            jnp.where(hot, n_sampled, n_greedy))
