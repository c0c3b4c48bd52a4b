"""A SmolLM2-shaped target that kestrel-nano can draft for: nano widened, plus perturbing layers.

A draft model needs the target's tokenizer, and no SmolLM2-shaped checkpoint speaks kestrel-nano's
8,768-token vocabulary. This builds one: SmolLM2-135M's shape (30 layers, width 576, 9 query and
3 kv heads of 64, FFN 1536), so every target pass costs what a SmolLM2 pass costs (less the
smaller vocabulary), with nano's vocabulary and a function close to nano's:

- layers 1-4 are nano's 4 layers embedded exactly: nano's 256 residual dims are the first 256 of
  576 (the rest stay zero through them), its 4 query heads sit in the 9 so that each keeps its kv
  head (nano groups 2 queries per kv head, the target 3: the third query of a group and the
  third kv head are zero), FFN columns past 1024 are zero, and every RMSNorm's weight is scaled by
  sqrt(256 / 576) with eps scaled by 256 / 576, so a norm over 576 dims of which 320 are zero
  gives nano's norm over its 256;
- layers 5-30 are random (the usual 0.02 init) with their attention output and MLP down
  projections scaled by ``perturbation``: 0 leaves nano's function exactly (every draft of
  nano's is accepted); larger values move the target's argmax away from nano's on more tokens.

The result is synthetic: its acceptance rate is a dial, not a property of a trained pair; the
benchmark reports the rate it measured beside the speed-up.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import Transformer, init_model

SMOLLM2_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     intermediate_size=1536)


def _pad(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _head_map(nano_heads: int, nano_kv: int, heads: int, kv: int) -> list[int]:
    """Target query head of each nano query head, keeping each on its own kv head's group."""
    nano_group, group = nano_heads // nano_kv, heads // kv
    if nano_kv > kv or nano_group > group:
        raise ValueError(f"nano's {nano_heads}/{nano_kv} heads do not fit in {heads}/{kv}")
    return [(i // nano_group) * group + i % nano_group for i in range(nano_heads)]


def nano_shaped_target(nano: Transformer, perturbation: float, seed: int = 0,
                       shape: dict | None = None) -> Transformer:
    """SmolLM2's shape, nano's vocabulary and first layers (see the module docstring).

    Args:
      nano: the draft (kestrel-nano), global attention layers, no attention bias.
      perturbation: scale of the extra layers' residual writes (0: the target is nano exactly).
      seed: the extra layers' initialisation.
      shape: the target's hidden_size, num_layers, num_heads, num_kv_heads, head_dim and
        intermediate_size (default ``SMOLLM2_SHAPE``); each at least nano's.

    Returns:
      The target ``Transformer``.
    """
    src_cfg, shape = nano.config, shape or SMOLLM2_SHAPE
    smaller = [k for k, v in shape.items() if v < getattr(src_cfg, k)]
    if smaller or src_cfg.head_dim != shape["head_dim"]:
        raise ValueError(f"the target shape {shape} must keep nano's head_dim and be at least "
                         f"nano's size in {smaller or ['head_dim']}")
    if src_cfg.attention_bias or src_cfg.post_norms or set(src_cfg.layer_types) != {"global"}:
        raise ValueError("nano_shaped_target widens models of global layers without attention "
                         "biases or post-norms")
    d0, d = src_cfg.hidden_size, shape["hidden_size"]
    cfg = dataclasses.replace(src_cfg, **shape, norm_eps=src_cfg.norm_eps * d0 / d,
                              layer_types=("global",) * shape["num_layers"])
    target = init_model(cfg, seed)
    src = nnx.to_flat_state(nnx.state(nano, nnx.Param))
    src = {path: np.asarray(v.get_value()) for path, v in src}
    flat = nnx.to_flat_state(nnx.state(target, nnx.Param))
    norm_scale = np.float32(np.sqrt(d0 / d))
    heads = _head_map(src_cfg.num_heads, src_cfg.num_kv_heads, cfg.num_heads, cfg.num_kv_heads)
    kv_heads = list(range(src_cfg.num_kv_heads))
    updates = []
    for path, var in flat:
        x = np.asarray(var.get_value())
        key = tuple(str(p) for p in path)
        layer = int(key[1]) if key[0] == "blocks" else None
        if layer is not None and layer >= src_cfg.num_layers:
            if key[-2:] in (("attn", "o_proj"), ("mlp", "down")):
                x = x * np.float32(perturbation)
            updates.append((path, x))
            continue
        w = src[path]
        name = key[-2] if key[-1] == "scale" else key[-1]
        if key[-1] == "scale" and name in ("q_norm", "k_norm"):
            y = w  # over head_dim: unchanged by the widening
        elif key[-1] == "scale":  # a norm over the residual stream
            y = _pad(w * norm_scale, x.shape)
        elif name in ("q_proj",):  # [D, N, H]
            y = np.zeros_like(x)
            y[:d0, heads] = w
        elif name in ("k_proj", "v_proj"):  # [D, K, H]
            y = np.zeros_like(x)
            y[:d0, kv_heads] = w
        elif name == "o_proj":  # [N, H, D]
            y = np.zeros_like(x)
            y[heads, :, :d0] = w
        else:  # embedding table [V, D], lm_head, gate/up [D, F], down [F, D]
            y = _pad(w, x.shape)
        updates.append((path, y))
    nnx.update(target, nnx.from_flat_state([(p, jnp.asarray(x)) for p, x in updates]))
    return target
