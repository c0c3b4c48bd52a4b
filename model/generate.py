"""Offline generation and scoring over the dense KV cache, compiled once per shape bucket.

Prompts are right-padded to a power-of-two bucket (padding gets position -1, so nothing attends
to it) and the whole decode loop runs on device in one ``lax.while_loop``, so steady-state
decoding costs one dispatch per request batch, not one per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kestrel.errors import KestrelError
from model.kv_cache import KVCache
from model.sampling import sample
from model.token_shift import previous_tokens
from model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for one call; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise KestrelError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise KestrelError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KestrelError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise KestrelError(f"min-p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise KestrelError(f"top-k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class Generation:
    """One row's result: generated ids (stop token included) and their log-probabilities."""

    token_ids: list[int]
    logprobs: list[float]


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= n (at least ``minimum``): the shapes we compile for."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "cache_len", "attn_impl"))
def _generate(graphdef, state, prompt, lengths, params, key, *, max_new, cache_len, attn_impl):
    """Prefill every prompt, then decode up to max_new tokens per row on device.

    Module-level (graphdef static) so every Generator over the same architecture shares the
    compiled program.
    """
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    positions = jnp.where(jnp.arange(t)[None, :] < lengths[:, None],
                          jnp.arange(t)[None, :], -1).astype(jnp.int32)
    cache = KVCache.create(model.config, b, cache_len)
    # The token before each input token (token_shift models); unused by the others.
    prev = previous_tokens(prompt, positions=positions)
    logits, cache = model(prompt, positions=positions, cache=cache, attn_impl=attn_impl,
                          logits_index=lengths - 1, prev_tokens=prev)
    temperature, top_k, top_p, min_p, stop_ids = params

    def pick(logits, step):
        logits = logits[:, 0]  # [B, V]
        tok = sample(logits, jax.random.fold_in(key, step), temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], 1)[:, 0]
        return tok, logprob

    tok, lp = pick(logits, 0)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, stop_ids)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, tok, pos, cache, out, done, out_lp = carry
        before = jnp.where(step == 1, jnp.take_along_axis(prompt, lengths[:, None] - 1, 1)[:, 0],
                           out[:, jnp.maximum(step - 2, 0)])
        logits, cache = model(tok[:, None], positions=pos[:, None], cache=cache,
                              attn_impl=attn_impl, prev_tokens=before[:, None])
        new, lp = pick(logits, step)
        new = jnp.where(done, 0, new)
        out = out.at[:, step].set(new)
        out_lp = out_lp.at[:, step].set(jnp.where(done, 0.0, lp))
        done = done | jnp.isin(new, stop_ids)
        return step + 1, new, pos + 1, cache, out, done, out_lp

    carry = (jnp.int32(1), tok, lengths.astype(jnp.int32), cache, out, done, out_lp)
    step, _, _, _, out, _, out_lp = jax.lax.while_loop(cond, body, carry)
    return out, out_lp, step


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl"))
def _score(graphdef, state, tokens, positions, *, attn_impl):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions=positions, attn_impl=attn_impl)
    return jax.nn.log_softmax(logits, axis=-1)


class Generator:
    """Compiled prefill + decode-loop and teacher-forced scoring for one model."""

    def __init__(self, model: Transformer, *, attn_impl: str = "auto"):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.attn_impl = attn_impl

    def generate(self, prompts: list[list[int]], gen: GenerationConfig) -> list[Generation]:
        """Generates a continuation of each prompt (a batch of token-id lists)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise KestrelError("every prompt needs at least one token")
        context = self.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise KestrelError(f"prompt of {longest} tokens does not fit the model's context of "
                               f"{context} tokens")
        max_new = min(gen.max_new_tokens, context - longest)
        t = bucket(longest)
        prompt = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            prompt[i, :len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        b = len(prompts)
        params = (jnp.full((b,), gen.temperature, jnp.float32), jnp.full((b,), gen.top_k, jnp.int32),
                  jnp.full((b,), gen.top_p, jnp.float32), jnp.full((b,), gen.min_p, jnp.float32),
                  jnp.asarray(list(gen.stop_ids) or [-1], jnp.int32))
        new_bucket = bucket(max_new, minimum=8)
        out, out_lp, steps = _generate(self.graphdef, self.state, jnp.asarray(prompt),
                                       jnp.asarray(lengths), params, jax.random.key(gen.seed),
                                       max_new=new_bucket, cache_len=t + new_bucket,
                                       attn_impl=self.attn_impl)
        out, out_lp, steps = np.asarray(out), np.asarray(out_lp), int(steps)
        results = []
        stops = set(gen.stop_ids)
        for row, row_lp in zip(out, out_lp):
            ids, lps = [], []
            for tok, lp in zip(row[:min(steps, max_new)], row_lp):
                ids.append(int(tok))
                lps.append(float(lp))
                if int(tok) in stops:
                    break
            results.append(Generation(ids, lps))
        return results

    def score(self, ids: list[int]) -> Generation:
        """Teacher-forced scoring: for each next token, the argmax prediction and the
        log-probability the model gives the actual next token (len(ids) - 1 entries)."""
        if len(ids) < 2:
            raise KestrelError("scoring needs at least two token ids")
        if len(ids) > self.config.max_position_embeddings:
            raise KestrelError(f"{len(ids)} ids do not fit the model's context of "
                               f"{self.config.max_position_embeddings} tokens")
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise KestrelError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        t = bucket(len(ids))
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :len(ids)] = ids
        positions = np.where(np.arange(t) < len(ids), np.arange(t), -1)[None].astype(np.int32)
        logprobs = np.asarray(_score(self.graphdef, self.state, jnp.asarray(tokens),
                                     jnp.asarray(positions), attn_impl=self.attn_impl))[0]
        n = len(ids) - 1
        given = logprobs[np.arange(n), np.asarray(ids[1:])]
        return Generation([int(x) for x in logprobs[:n].argmax(-1)], [float(x) for x in given])
