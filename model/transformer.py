"""The decoder-only transformer: embedding, blocks of attention + gated MLP, final norm, logits."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from model.attention import Attention
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCache
from model.layers import DTYPES, Embedding, GatedMLP, RMSNorm, param
from model.paged_cache import PagedKVCache
from model.quantization import linear, quantize_params, read_weight
from model.rope import inverse_frequencies, rope_tables


class Block(nnx.Module):
    """Pre-norm residual block; Gemma adds post-norms on each branch's output."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, param_dtype=cfg.param_dtype, rngs=rngs)
        self.layer_type = layer_type
        self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, layer_type, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm) if cfg.post_norms else None
        self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = GatedMLP(cfg, rngs=rngs)
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, **norm) if cfg.post_norms else None

    def __call__(self, x: Float[Array, "B T D"], **attn_kwargs):
        h, kv = self.attn(self.attn_norm(x), **attn_kwargs)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, kv


class Transformer(nnx.Module):
    """Kestrel's model family (Llama, Qwen2/3, Gemma 3 text and Kestrel's own are configs of it)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embedding(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, t, rngs=rngs) for t in cfg.layer_types])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                                  param_dtype=cfg.param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        if cfg.quantization is not None:
            # Weights become int8 QArrays in their Params, so an abstract (eval_shape) model of a
            # quantized config has the shapes and dtypes a quantized checkpoint restores into.
            state = nnx.state(self, nnx.Param)
            nnx.replace_by_pure_dict(state, quantize_params(nnx.to_pure_dict(state),
                                                            scale_dtype=DTYPES[cfg.dtype]))
            nnx.update(self, state)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        span_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        embeddings: Float[Array, "B T D"] | None = None,
        attn_impl: str = "auto",
        return_hidden: bool = False,
        logits_index: Int[Array, "B"] | None = None,
    ):
        """Runs the model over tokens, optionally extending a KV cache.

        Args:
          tokens: token ids [B, T].
          positions: absolute positions [B, T]; defaults to the cache's fill count + arange(T).
            A negative position marks a padding token that nothing attends to.
          segment_ids: packed-document ids [B, T] (training; not with a cache).
          span_ids: bidirectional span ids [B, T] (0 outside spans), e.g. image tokens.
          cache: a KVCache to attend over and extend, a PagedKVCache (serving: positions come
            from it), or None for a self-contained pass.
          embeddings: input embeddings [B, T, D] replacing the token lookup (image splicing).
          attn_impl: attention kernel implementation.
          return_hidden: also return the final hidden states [B, T, D].
          logits_index: compute logits only at this index of each row ([B, 1, V] out), which
            saves the [T, V] projection when only the next token matters (prefill).

        Returns:
          (logits [B, T, V] float32, updated cache or None[, hidden [B, T, D]]).
        """
        cfg = self.config
        b, t = tokens.shape
        paged = isinstance(cache, PagedKVCache)
        if paged and positions is None:
            positions = cache.positions
        # Without a cache or given positions the mask is static (0..T-1), so attention may plan
        # its block sparsity at trace time instead of from runtime positions.
        static_positions = positions is None and cache is None
        if positions is None:
            start = cache.lengths[:, None] if cache is not None else jnp.zeros((b, 1), jnp.int32)
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        if span_ids is not None and cache is not None:
            raise ValueError("span_ids with a KV cache are not supported: the cache keeps no span "
                             "ids; run spans (images) through a cache-free forward or prefill")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training sequences, not cached decoding")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(DTYPES[cfg.dtype])
        ropes = {kind: rope_tables(jnp.maximum(positions, 0), *freqs)
                 for kind, freqs in rope_frequencies(cfg).items()}

        if paged:
            kv_positions, write = None, None
        elif cache is not None:
            slots = cache.slots(t)
            advanced = cache.advance(positions)
            kv_positions = advanced.positions
            write = lambda values, new: cache.write(slots, values, new)  # noqa: E731
        else:
            kv_positions, write = positions, None
        q_positions = None if static_positions else positions
        if static_positions:
            kv_positions = None

        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(
                x, rope=ropes[block.layer_type], q_positions=q_positions, kv_positions=kv_positions,
                keys_values=None if cache is None or paged else (cache.k[i], cache.v[i]), write=write,
                q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                q_span_ids=span_ids, kv_span_ids=span_ids, impl=attn_impl,
                attend=functools.partial(cache.attend, i) if paged else None)
            new_k.append(k)
            new_v.append(v)
        hidden = self.final_norm(x)
        if logits_index is None:
            logits = self.logits(hidden)
        else:
            logits = self.logits(jnp.take_along_axis(hidden, logits_index[:, None, None], axis=1))
        new_cache = None
        if paged:
            new_cache = cache.with_pages(new_k, new_v)
        elif cache is not None:
            new_cache = dataclasses.replace(advanced, k=tuple(new_k), v=tuple(new_v))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Output logits in float32, soft-capped when the config says so."""
        if self.lm_head is None:
            logits = self.embed.attend(hidden)
        else:
            logits = linear("BTD,VD->BTV", hidden, read_weight(self.lm_head), dtype=hidden.dtype,
                            quantize_activations=self.config.quantization == "int8-w8a8")
        logits = logits.astype(jnp.float32)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits


def rope_frequencies(cfg: ModelConfig) -> dict[str, tuple]:
    """Inverse frequencies and attention factor for global and sliding layers (numpy, static)."""
    global_rope = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings)
    if cfg.rope_local_theta is None:
        return {"global": global_rope, "sliding": global_rope}
    return {"global": global_rope, "sliding": inverse_frequencies(
        cfg.head_dim, cfg.rope_local_theta, RopeScaling(), cfg.max_position_embeddings)}


@functools.partial(nnx.jit, static_argnums=0)
def _init_compiled(cfg: ModelConfig, seed) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (normal(0.02) weights, unit norms).

    Built in one compiled program (eagerly, every parameter's initialiser would compile on its
    own); the values equal an initialisation traced inside any other jit, e.g. the training loop's.
    """
    return _init_compiled(cfg, jax.random.key(seed))
