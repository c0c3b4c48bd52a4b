"""The transformer's building blocks: parameters with logical axes, RMSNorm, gated MLP, embedding.

Parameters carry a ``logical_axes`` metadata tuple (``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``); ``sharding/rules.py`` maps those names to mesh axes, so no
layer knows about meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from model.config import ModelConfig
from model.quantization import linear, read_weight, take_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str,
          std: float = 0.02, init: str = "normal") -> nnx.Param:
    """A parameter initialised (normal with ``std``, or ``zeros``/``ones``) with logical axes."""
    if init == "normal":
        value = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(value.astype(DTYPES[dtype]), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, in float32; Gemma's ``1 + w`` form when ``plus_one``."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool, param_dtype: str, rngs: nnx.Rngs):
        self.eps = eps
        self.plus_one = plus_one
        # Gemma stores w around 0 (scale 1 + w); the others store the scale itself.
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init="zeros" if plus_one else "ones")

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].astype(jnp.float32)
        return (normed * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def activation_fn(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    return lambda x: jax.nn.gelu(x, approximate=False)


class GatedMLP(nnx.Module):
    """SwiGLU / GeGLU: down(act(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = DTYPES[cfg.dtype]
        self.quantize_activations = cfg.quantization == "int8-w8a8"
        self.act = activation_fn(cfg.activation)
        self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg.param_dtype)
        self.down = param(rngs, (f, d), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        mm = lambda eq, a, w: linear(eq, a, read_weight(w), dtype=self.dtype,  # noqa: E731
                                     quantize_activations=self.quantize_activations)
        gate = mm("BTD,DF->BTF", x, self.gate)
        up = mm("BTD,DF->BTF", x, self.up)
        return mm("BTF,FD->BTD", self.act(gate) * up, self.down)


class Embedding(nnx.Module):
    """Token embedding table [V, D]; also the output projection when embeddings are tied.

    Quantized models keep the table in int8 with one scale per row (``model/quantization.py``).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.table = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           cfg.param_dtype)
        self.dtype = DTYPES[cfg.dtype]
        self.quantize_activations = cfg.quantization == "int8-w8a8"
        # Gemma multiplies by sqrt(D) rounded to the compute dtype, as transformers does.
        # numpy, not jnp: this runs under nnx.eval_shape / jit tracing too.
        self.scale = float(np.asarray(cfg.hidden_size ** 0.5, self.dtype)) if cfg.embed_scale else None

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        x = take_rows(read_weight(self.table), tokens, self.dtype)
        return x * jnp.asarray(self.scale, self.dtype) if self.scale is not None else x

    def attend(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        return linear("BTD,VD->BTV", x, read_weight(self.table), dtype=x.dtype,
                      quantize_activations=self.quantize_activations)
