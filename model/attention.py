"""Grouped-query self-attention layer: projections, q/k norm, RoPE, and the kernel dispatch."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import qwix
from flax import nnx
from jaxtyping import Array, Float, Int

from model import kernels
from model.config import ModelConfig
from model.layers import DTYPES, RMSNorm, param
from model.quantization import linear, read_weight
from model.rope import apply_rope


class Attention(nnx.Module):
    """One attention layer; ``sliding`` layers see a left window of ``cfg.sliding_window`` tokens."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs,
                 embedding_values: bool = False):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = DTYPES[cfg.dtype]
        self.quantize_activations = cfg.quantization == "int8-w8a8"
        self.window = cfg.sliding_window if layer_type == "sliding" else None
        self.scale = cfg.scale
        self.soft_cap = cfg.attn_logit_softcap
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.param_dtype)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg.param_dtype)
        if cfg.attention_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), cfg.param_dtype, init="zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), cfg.param_dtype, init="zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), cfg.param_dtype, init="zeros")
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        norm = dict(eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(h, **norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, **norm) if cfg.qk_norm else None
        # Copy heads (ModelConfig.embedding_value_layers): values from the normed token embedding.
        self.value_norm = RMSNorm(d, **norm) if embedding_values else None

    def _linear(self, equation, x, weight):
        return linear(equation, x, read_weight(weight), dtype=self.dtype,
                      quantize_activations=self.quantize_activations)

    def _output(self, out: Float[Array, "B T N H"]) -> Float[Array, "B T D"]:
        """The output projection as one [B, T, N * H] x [N * H, D] matmul. Written as the einsum
        over (N, H), XLA:CPU transposed the [N, H, D] weight at every call (30 copies of 1.3 MB
        per SmolLM2-135M decode step) instead of the small activations."""
        w = read_weight(self.o_proj)
        n, h, d = w.shape
        if isinstance(w, qwix.QArray):  # int8: one scale per output channel, [1, 1, D]
            w = dataclasses.replace(w, qvalue=w.qvalue.reshape(n * h, d), scale=w.scale.reshape(1, d))
        else:
            w = w.reshape(n * h, d)
        return linear("BTF,FD->BTD", out.reshape(*out.shape[:2], n * h), w, dtype=self.dtype,
                      quantize_activations=self.quantize_activations)

    def project(self, x: Float[Array, "B T D"], rope: tuple[Array, Array],
                embeddings: Float[Array, "B T D"] | None = None):
        """Queries, keys and values of x, normed and rotated: [B,T,N,H], [B,T,K,H], [B,T,K,H].
        A copy layer's values come from ``embeddings`` (the inputs' token embeddings)."""
        q = self._linear("BTD,DNH->BTNH", x, self.q_proj)
        k = self._linear("BTD,DKH->BTKH", x, self.k_proj)
        if self.value_norm is not None:
            if embeddings is None:
                raise ValueError("a copy layer (embedding_value_layers) needs the token embeddings")
            x = self.value_norm(embeddings)
        v = self._linear("BTD,DKH->BTKH", x, self.v_proj)
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(self.dtype)
            k = k + self.k_bias[...].astype(self.dtype)
            v = v + self.v_bias[...].astype(self.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        rope: tuple[Array, Array],
        q_positions: Int[Array, "B T"] | None,
        kv_positions: Int[Array, "B S"],
        keys_values: tuple[Array, Array] | None = None,
        write=None,
        q_segment_ids: Int[Array, "B T"] | None = None,
        kv_segment_ids: Int[Array, "B S"] | None = None,
        q_span_ids: Int[Array, "B T"] | None = None,
        kv_span_ids: Int[Array, "B S"] | None = None,
        impl: str = "auto",
        attend=None,
        embeddings: Float[Array, "B T D"] | None = None,
        keys_in_query_order: bool = False,
    ):
        """Attends x's queries over x's keys, or over a cache that ``write`` extends with them.

        Args:
          x: the layer input [B, T, D].
          rope: cos and sin tables [B, T, H] for x's positions.
          q_positions: positions of x's tokens [B, T]; None (with kv_positions None) means
            0..T-1, a mask the kernel can plan at trace time.
          kv_positions: positions of the attended keys [B, S] (-1: empty slot).
          keys_values: this layer's cached keys and values [B, S, K, H], or None for self-only.
          write: ``write(cache_array, new)`` stores new [B, T, K, H] into a cache array.
          impl: the attention kernel implementation.
          attend: a cache that places keys itself (the paged serving cache): ``attend(q, k, v, *,
            window, scale, soft_cap, impl) -> (out [B, T, N, H], updated cache arrays)``; replaces
            ``keys_values``/``write`` and the kernel call.
          embeddings: the inputs' token embeddings [B, T, D], the values of a copy layer.
          keys_in_query_order: self-attention over x alone with positions ascending along each
            segment (see ``kernels.attention``), so the kernel may skip the keys after a query.

        Returns:
          ([B, T, D] output, (keys, values) as attended: the updated cache arrays).
        """
        q, k, v = self.project(x, rope, embeddings)
        if attend is not None:
            out, kv = attend(q, k, v, window=self.window, scale=self.scale, soft_cap=self.soft_cap,
                             impl=impl)
            return self._output(out), kv
        if keys_values is not None:
            k, v = write(keys_values[0], k), write(keys_values[1], v)
        out = kernels.attention(
            q, k.astype(self.dtype), v.astype(self.dtype), q_positions=q_positions,
            kv_positions=kv_positions, causal=True, window=self.window,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            q_span_ids=q_span_ids, kv_span_ids=kv_span_ids, scale=self.scale,
            soft_cap=self.soft_cap, keys_in_query_order=keys_in_query_order, impl=impl)
        return self._output(out), (k, v)
