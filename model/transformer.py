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
from model.pointer import Pointer, allowed_positions, next_tokens, tokens_beside
from model.quantization import linear, quantize_params, read_weight
from model.rope import inverse_frequencies, rope_tables
from model.token_shift import TokenShift, previous_tokens
from model.vision import VisionTower, image_span_ids, splice_images, splice_images_by_span


class Block(nnx.Module):
    """Pre-norm residual block; Gemma adds post-norms on each branch's output."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs,
                 embedding_values: bool = False):
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, param_dtype=cfg.param_dtype, rngs=rngs)
        self.layer_type = layer_type
        self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, layer_type, rngs=rngs, embedding_values=embedding_values)
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
        self.token_shift = TokenShift(cfg, rngs=rngs) if cfg.token_shift else None
        self.blocks = nnx.List([Block(cfg, t, rngs=rngs, embedding_values=i in cfg.embedding_value_layers)
                                for i, t in enumerate(cfg.layer_types)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                                  param_dtype=cfg.param_dtype, rngs=rngs)
        self.pointer = Pointer(cfg, rngs=rngs) if cfg.pointer_dim else None
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        self.vision = None if cfg.vision is None else VisionTower(
            cfg.vision, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.quantization is not None:
            # Weights become int8 QArrays in their Params, so an abstract (eval_shape) model of a
            # quantized config has the shapes and dtypes a quantized checkpoint restores into.
            state = nnx.state(self, nnx.Param)
            nnx.replace_by_pure_dict(state, quantize_params(nnx.to_pure_dict(state),
                                                            scale_dtype=DTYPES[cfg.dtype]))
            nnx.update(self, state)

    def _shift(self, x, tokens, prev_tokens, positions, segment_ids, cache):
        """x plus the token shift of each position's previous token (``model/token_shift.py``)."""
        if prev_tokens is None:
            if cache is not None:
                raise ValueError("this model's token_shift needs prev_tokens (the token before each "
                                 "input token, -1 for none) when it runs with a KV cache")
            prev_tokens = previous_tokens(tokens, positions=positions, segment_ids=segment_ids)
        if prev_tokens.shape != tokens.shape:
            raise ValueError(f"prev_tokens {prev_tokens.shape} must match tokens {tokens.shape}")
        lookup = jnp.maximum(prev_tokens, 0)
        if self.config.vision is not None:  # an image placeholder may lie outside the vocabulary
            lookup = jnp.where(lookup == self.config.vision.image_token_id, 0, lookup)
        return self.token_shift(x, self.embed(lookup), prev_tokens)

    def encode_images(self, pixels: Float[Array, "I S S C"], attn_impl: str = "auto"
                      ) -> Float[Array, "I M D"]:
        """Soft tokens of preprocessed images (``serve.images.preprocess``), one row per image."""
        if self.vision is None:
            raise ValueError("this model has no vision tower (its config has no vision section)")
        return self.vision(pixels, attn_impl)

    def embed_with_images(self, tokens: Int[Array, "B T"], image_embeddings: Float[Array, "I M D"],
                          span_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
        """Token embeddings with the image placeholders replaced by the images' soft tokens: in
        reading order, or, given ``span_ids``, span ``s`` taking image ``s - 1`` (training batches)."""
        image_id = self.config.vision.image_token_id
        # The placeholder may lie outside the vocabulary (Gemma 3 allows it): look up id 0 there.
        x = self.embed(jnp.where(tokens == image_id, 0, tokens))
        if span_ids is not None:
            return splice_images_by_span(x, span_ids, image_embeddings)
        return splice_images(x, tokens, image_embeddings, image_id)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        span_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        embeddings: Float[Array, "B T D"] | None = None,
        prev_tokens: Int[Array, "B T"] | None = None,
        images: Float[Array, "I S S C"] | None = None,
        image_embeddings: Float[Array, "I M D"] | None = None,
        attn_impl: str = "auto",
        return_hidden: bool = False,
        logits_index: Int[Array, "B"] | None = None,
        return_exits: bool = False,
        exit_threshold: Float[Array, ""] | None = None,
    ):
        """Runs the model over tokens, optionally extending a KV cache.

        Args:
          tokens: token ids [B, T].
          positions: absolute positions [B, T]; defaults to the cache's fill count + arange(T).
            A negative position marks a padding token that nothing attends to.
          segment_ids: packed-document ids [B, T] (training; not with a cache). Each document is
            contiguous and its positions ascend along it (as ``train/packing.py`` writes them),
            so attention may skip, unscored, the keys after each query.
          span_ids: bidirectional span ids [B, T] (0 outside spans), e.g. image tokens.
          cache: a KVCache to attend over and extend, a PagedKVCache (serving: positions come
            from it), or None for a self-contained pass.
          embeddings: input embeddings [B, T, D] replacing the token lookup.
          prev_tokens: with ``cfg.token_shift``, the token before each of ``tokens`` [B, T]
            (-1: none). Derived from ``tokens`` (and ``segment_ids``) without a cache; with a
            cache a call's first token has its previous token elsewhere, so it must be given.
          images: preprocessed images [I, S, S, C] for the placeholders in ``tokens``: encoded by
            the vision tower, spliced in (in reading order; with ``span_ids``, span ``s`` takes
            image ``s - 1``, so ids are batch-wide), and each image's span made bidirectional.
          image_embeddings: the images' soft tokens [I, M, D] already encoded (a cache of them),
            used as ``images`` is.
          attn_impl: attention kernel implementation.
          return_hidden: also return the final hidden states [B, T, D].
          logits_index: compute logits only at this index of each row ([B] -> [B, 1, V] out), or
            at these indices ([B, K] -> [B, K, V]), which saves the [T, V] projection when only
            some positions matter (prefill: the next token; training: the loss positions).
          return_exits: also return the exit heads' logits, a tuple of [B, T, V] (one per
            ``cfg.exit_layers``), for training them.
          exit_threshold: early-exit decoding (paged cache, T = 1): at each exit layer, if the
            exit head's top probability exceeds this for every real row, the upper layers are
            skipped (``lax.cond``: their compute really is not run) and the exit head's logits
            returned; the skipped layers' K/V for the token are still written, projected from
            the exit layer's hidden state (CALM's state copying), so later tokens attend to it.

        Returns:
          (logits [B, T, V] float32, updated cache or None[, hidden [B, T, D]][, exit logits
          tuple][, exit layer: int32 scalar, 0 when no exit was taken]), extras in this order.
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
        if images is not None:
            if image_embeddings is not None:
                raise ValueError("give images or image_embeddings, not both")
            image_embeddings = self.encode_images(images, attn_impl)
        if image_embeddings is not None:
            if embeddings is not None:
                raise ValueError("give embeddings or images, not both")
            if cfg.vision is None:
                raise ValueError("this model has no vision tower (its config has no vision section)")
            if cache is not None:
                raise ValueError("images with a KV cache are not supported here: the serving runner "
                                 "splices them chunk by chunk (serve/runner.py); without a cache the "
                                 "image spans are made bidirectional")
            embeddings = self.embed_with_images(tokens, image_embeddings, span_ids)
            if span_ids is None:
                span_ids = image_span_ids(tokens, cfg.vision.image_token_id)
        x = self.embed(tokens) if embeddings is None else embeddings.astype(DTYPES[cfg.dtype])
        token_embeddings = x  # the values of copy layers (embedding_value_layers)
        if self.token_shift is not None:
            x = self._shift(x, tokens, prev_tokens, positions, segment_ids, cache)
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

        def block_at(i: int, x):
            block = self.blocks[i]
            return block(
                x, rope=ropes[block.layer_type], q_positions=q_positions, kv_positions=kv_positions,
                keys_values=None if cache is None or paged else (cache.k[i], cache.v[i]), write=write,
                q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                q_span_ids=span_ids, kv_span_ids=span_ids, impl=attn_impl,
                keys_in_query_order=cache is None and segment_ids is not None,
                attend=functools.partial(cache.attend, i) if paged else None,
                embeddings=token_embeddings if i in cfg.embedding_value_layers else None)

        if exit_threshold is not None:
            if self.pointer is not None:
                raise ValueError("early exit is not supported with a pointer (ModelConfig.pointer_dim): "
                                 "the pointer's keys are read from the last layer's hidden states")
            if not paged or t != 1 or return_hidden or return_exits:
                raise ValueError("exit_threshold is for decoding one token per row over a paged "
                                 "cache, without return_hidden / return_exits")
            if not cfg.exit_layers:
                raise ValueError("exit_threshold needs a model with exit heads (ModelConfig.exit_layers)")
            real = positions[:, -1] >= 0  # padding rows of the decode batch do not vote
            logits, kvs, exit_layer = self._decode_from(0, x, block_at, ropes, cache, exit_threshold, real,
                                                        token_embeddings)
            new_cache = cache.with_pages([k for k, _ in kvs], [v for _, v in kvs])
            return logits, new_cache, exit_layer

        new_k, new_v, exit_logits = [], [], []
        for i in range(cfg.num_layers):
            x, (k, v) = block_at(i, x)
            new_k.append(k)
            new_v.append(v)
            if return_exits and i + 1 in cfg.exit_layers:
                exit_logits.append(self.logits(self.final_norm(x)))
        hidden = self.final_norm(x)
        rows = None if logits_index is None else (
            logits_index[:, None] if logits_index.ndim == 1 else logits_index)  # [B, K]
        hidden_out = hidden if rows is None else jnp.take_along_axis(hidden, rows[..., None], axis=1)
        logits = self.logits(hidden_out)
        new_cache = None
        if paged:  # a pointer's pages (after the layers') are updated by _point
            new_cache = cache.with_pages(new_k + list(cache.k[len(new_k):]), new_v + list(cache.v[len(new_v):]))
        elif cache is not None:
            new_cache = dataclasses.replace(advanced, k=tuple(new_k), v=tuple(new_v))
        if self.pointer is not None:
            logits, new_cache = self._point(logits, hidden, hidden_out, rows, tokens, positions,
                                            segment_ids, new_cache, None if paged or cache is None else slots)
        out = (logits, new_cache)
        if return_hidden:
            out += (hidden,)
        if return_exits:
            out += (tuple(exit_logits),)
        return out

    def _decode_from(self, lo: int, x: Float[Array, "B 1 D"], block_at, ropes, cache: PagedKVCache,
                     threshold: Float[Array, ""], real, token_embeddings):
        """Blocks lo.. up to the next exit layer, then either stop there (every real row is
        confident) or go on to the next exit / the end; nested ``lax.cond``s, so a taken exit skips
        the upper layers' compute.

        Returns:
          (logits [B, 1, V], per layer from lo its (k pages, v pages), exit layer int32 (0: none)).
        """
        cfg = self.config
        later = [e for e in cfg.exit_layers if e > lo]
        hi = later[0] if later else cfg.num_layers
        kvs = []
        for i in range(lo, hi):
            x, kv = block_at(i, x)
            kvs.append(kv)
        exit_logits = self.logits(self.final_norm(x))
        if not later:
            return exit_logits, tuple(kvs), jnp.int32(0)
        confidence = jnp.max(jax.nn.softmax(exit_logits[:, -1], axis=-1), axis=-1)  # [B]
        confident = jnp.all(jnp.where(real, confidence > threshold, True))

        def stop(x):
            filled = []
            for i in range(hi, cfg.num_layers):  # CALM: the exit state stands in for the layer input
                block = self.blocks[i]
                _, k, v = block.attn.project(block.attn_norm(x), ropes[block.layer_type],
                                             token_embeddings if block.attn.value_norm is not None else None)
                filled.append(cache.store(i, k, v))
            return exit_logits, tuple(filled), jnp.int32(hi)

        def go_on(x):
            return self._decode_from(hi, x, block_at, ropes, cache, threshold, real, token_embeddings)

        logits, rest, exit_layer = jax.lax.cond(confident, stop, go_on, x)
        return logits, tuple(kvs) + tuple(rest), exit_layer

    def _copyable(self, tokens: Int[Array, "B T"]) -> Int[Array, "B T"]:
        """The token ids the pointer may copy: image placeholders become -1 (never copied)."""
        if self.config.vision is None:
            return tokens
        return jnp.where(tokens == self.config.vision.image_token_id, -1, tokens)

    def _point(self, logits, hidden, hidden_out, rows, tokens, positions, segment_ids, cache, slots):
        """Mixes the pointer's copy distribution into ``logits`` (at ``rows`` of the step, or every
        position), over the context this pass sees: its own tokens, or the cache's once the new
        tokens' pointer keys and ids are written into it (``slots``: a dense cache's).

        Returns:
          (log-probabilities shaped as ``logits``, the cache with the pointer's entries updated).
        """
        keys, ids = self.pointer.keys(hidden), self._copyable(tokens)
        if isinstance(cache, PagedKVCache):
            (key_pages, id_pages), (keys, ids, allowed) = cache.pointer_context(keys, ids, rows)
            cache = cache.with_pages(cache.k[:-1] + (key_pages,), cache.v[:-1] + (id_pages,))
            r = keys.shape[0]  # per-sequence contexts: the step's rows, or one per packed query
            out = self.pointer.mix(logits.reshape(r, -1, logits.shape[-1]),
                                   hidden_out.reshape(r, -1, hidden_out.shape[-1]), keys, ids, allowed)
            return out.reshape(logits.shape), cache
        pick = (lambda a: a) if rows is None else (lambda a: jnp.take_along_axis(a, rows, axis=1))  # noqa: E731
        if cache is None:  # a sequence's tokens are contiguous in its row
            allowed = allowed_positions(pick(positions), positions, None if segment_ids is None else
                                        pick(segment_ids), segment_ids)
            return self.pointer.mix(logits, hidden_out, keys, tokens_beside(ids), allowed), None
        cache = dataclasses.replace(cache, pointer_keys=cache.write(slots, cache.pointer_keys, keys),
                                    token_ids=cache.write(slots, cache.token_ids, ids))
        allowed = allowed_positions(pick(positions), cache.positions)
        return self.pointer.mix(logits, hidden_out, cache.pointer_keys,
                                next_tokens(cache.token_ids, cache.positions), allowed), cache

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
