"""int8 quantization of the model's weights (linear layers and the embedding table), with qwix.

Two weight quantization types, named as the field names them:

- ``int8``: weight-only (vLLM's W8A16, llama.cpp's Q8_0 in spirit): every linear weight and the
  embedding table are stored as int8 with one float scale per output channel (per row of the
  embedding table); matmuls run on the int8 values cast to the activation dtype and scale their
  output channels.
- ``int8-w8a8``: the same int8 weights, and the activations entering each linear layer are
  quantized to int8 on the fly (symmetric absmax, one scale per token), so the matmul runs
  int8 x int8 -> int32 and is rescaled afterwards (vLLM's W8A8 int8).

A quantized weight is a ``qwix.QArray`` (int8 ``qvalue`` plus ``scale``) held in the same
``nnx.Param`` the float weight was in, so split/merge, jit, ``nnx.to_pure_dict`` and orbax
checkpoints carry it unchanged. w8a8 matmuls go through ``qwix.einsum`` (int8 x int8 -> int32,
then both scales); weight-only ones scale the output of a matmul on the cast int8 values.

qwix's ``quantize_model`` (interception of the model's einsums) is not used: our layers cast
each weight to the compute dtype before their einsum, and the serving runner calls
``Transformer.logits`` outside the intercepted ``__call__``. One ``linear`` entry point that every
layer calls is the same idea without the interception; the embedding gather (which qwix's PTQ
does not cover for a plain table) is ``take_rows`` below.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import qwix

from kestrel.errors import KestrelError

WEIGHT_QUANTIZATIONS = {
    "int8": "int8 weights with per-channel scales, compute in the activation dtype",
    "int8-w8a8": "int8 weights and per-token int8 activations, int32 accumulation",
}
KV_CACHE_DTYPES = {
    "auto": "the model's compute dtype",
    "float32": "float32 pages",
    "bfloat16": "bfloat16 pages",
    "float16": "float16 pages",
    "int8": "int8 pages with one float32 scale per page and kv head",
}

# Which parameters are quantized, and along which axes each keeps its own scale: the output
# channels of a weight (the axes its einsum does not contract), the rows of an embedding table.
# Norms and biases stay in float: they are tiny and sensitive.
WEIGHT_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"blocks/\d+/attn/(q|k|v)_proj", (1, 2)),  # [D, N|K, H]
    (r"blocks/\d+/attn/o_proj", (2,)),  # [N, H, D]
    (r"blocks/\d+/mlp/(gate|up|down)", (1,)),  # [D, F] / [F, D]
    (r"embed/table", (0,)),  # [V, D]: one scale per token row
    (r"lm_head", (0,)),  # [V, D]
)


class UnsupportedQuantization(KestrelError, ValueError):
    """A quantization or KV cache type that Kestrel does not implement."""


def _listing(table: dict[str, str]) -> str:
    return "; ".join(f"{name} ({what})" for name, what in table.items())


def check_quantization(name: str | None) -> str | None:
    """Returns ``name`` if it is a supported weight quantization type (or None), else raises."""
    if name is not None and name not in WEIGHT_QUANTIZATIONS:
        raise UnsupportedQuantization(
            f"quantization type {name!r} is not supported; supported: "
            f"{_listing(WEIGHT_QUANTIZATIONS)}")
    return name


def check_kv_cache_dtype(name: str | None) -> str:
    """Returns the KV cache dtype (``auto`` for None) if supported, else raises."""
    name = "auto" if name is None else name
    if name not in KV_CACHE_DTYPES:
        raise UnsupportedQuantization(
            f"KV cache dtype {name!r} is not supported; supported: {_listing(KV_CACHE_DTYPES)}")
    return name


def channel_axes(path: str) -> tuple[int, ...] | None:
    """The scale axes of the parameter at ``path`` ("blocks/0/attn/q_proj"), None: kept float."""
    for pattern, axes in WEIGHT_RULES:
        if re.fullmatch(pattern, path):
            return axes
    return None


def quantize_params(params: dict, scale_dtype) -> dict:
    """Quantizes the weights of a pure-dict parameter tree to int8 ``QArray`` leaves.

    Args:
      params: ``nnx.to_pure_dict`` of the model's Params (float leaves).
      scale_dtype: dtype of the scales, which is also the dtype weights dequantize to.

    Returns:
      The same tree with every weight that ``WEIGHT_RULES`` names replaced by a QArray.
    """
    def walk(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = walk(value, path + "/")
            elif isinstance(value, qwix.QArray) or channel_axes(path) is None:
                out[key] = value
            else:
                out[key] = qwix.quantize(value, jnp.int8, channelwise_axes=channel_axes(path),
                                         scale_dtype=scale_dtype)
        return out

    return walk(params, "")


def dequantize_params(params: dict) -> dict:
    """The float tree of a (possibly) quantized pure-dict parameter tree."""
    return jax.tree.map(lambda x: qwix.dequantize(x) if isinstance(x, qwix.QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, qwix.QArray))


def read_weight(param):
    """A parameter's value: a float array, or a QArray when quantized."""
    return param.get_value()


def linear(equation: str, x: jax.Array, w, *, dtype, quantize_activations: bool = False):
    """``einsum(equation, x, w)`` in ``dtype`` for a float or int8 (QArray) weight ``w``.

    Args:
      equation: a two-operand einsum, activations first (``"BTD,DF->BTF"``).
      x: the activations.
      w: the weight: a float array or a ``qwix.QArray``.
      dtype: the compute dtype.
      quantize_activations: quantize ``x`` to int8 with one scale per token (every axis of x that
        the einsum keeps), so that the matmul runs in integers (w8a8).

    Returns:
      The result in ``dtype``.
    """
    x = x.astype(dtype)
    if not isinstance(w, qwix.QArray):
        return jnp.einsum(equation, x, w.astype(dtype))
    inputs, out = equation.split("->")
    x_letters, w_letters = inputs.split(",")
    if quantize_activations:
        keep = tuple(i for i, letter in enumerate(x_letters) if letter in out)
        xq = qwix.quantize(x, jnp.int8, channelwise_axes=keep, scale_dtype=jnp.float32)
        return qwix.einsum(equation, xq, w.astype(jnp.float32)).astype(dtype)
    # Weight-only: the scales sit on output channels only, so they commute with the contraction:
    # einsum(x, q) * scale equals einsum(x, q * scale) without materialising a dequantized
    # weight. (qwix.einsum dequantizes first, which XLA fuses into the matmul on TPU but not on
    # CPU: a chain of [8, 576] x [576, 1536] matmuls on the shared 2-core CPU took 15x float's
    # time that way, 2.3x this way.)
    if any(n > 1 for letter, n in zip(w_letters, w.scale.shape) if letter not in out):
        return qwix.einsum(equation, x, w.astype(dtype)).astype(dtype)  # scales on contracted axes
    kept = [letter for letter in w_letters if letter in out]
    y = jnp.einsum(equation, x, w.qvalue.astype(dtype))
    scale = w.scale.reshape([n for letter, n in zip(w_letters, w.scale.shape) if letter in out])
    scale = jnp.einsum(f"{''.join(kept)}->{''.join(c for c in out if c in kept)}", scale)
    shape = [y.shape[i] if c in kept else 1 for i, c in enumerate(out)]
    return y * scale.reshape(shape).astype(dtype)


def take_rows(table, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``table[ids]`` of a float or per-row int8 (QArray) table, in ``dtype``: [..., D]."""
    if not isinstance(table, qwix.QArray):
        return jnp.take(table, ids, axis=0).astype(dtype)
    rows = jnp.take(table.qvalue, ids, axis=0).astype(dtype)  # [..., D]
    scales = jnp.take(table.scale, ids, axis=0).astype(dtype)  # [..., 1]
    return rows * scales


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (QArrays count their int8 values and their scales)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def quantize_model(model, quantization: str):
    """A copy of a float ``Transformer`` with int8 weights (``quantization``: see the module doc).

    Raises:
      UnsupportedQuantization: an unknown type, or a model that is already quantized.
    """
    from flax import nnx

    from model.transformer import Transformer

    check_quantization(quantization)
    cfg = model.config
    if cfg.quantization is not None:
        raise UnsupportedQuantization(f"the model is already quantized ({cfg.quantization})")
    qcfg = cfg.replace(quantization=quantization)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(qcfg, rngs=nnx.Rngs(0))))
    params = quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                             scale_dtype=jnp.dtype(qcfg.dtype))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
