"""Hugging Face tensor names and layouts <-> Kestrel parameter paths and layouts.

One table (``param_specs``) lists, for a ModelConfig, every Kestrel parameter with the HF tensor
it comes from and how the layout changes (HF Linear weights are [out, in]; Kestrel keeps heads
as their own axis, e.g. q_proj [D, N, H]). Import and export both read this table, so the two
directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from kestrel.errors import KestrelError
from model.config import ModelConfig
from model.convert import hf_vision


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: Kestrel path, HF name, both shapes, and the two layout changes."""

    path: str  # e.g. "blocks/0/attn/q_proj"
    hf_name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    to_kestrel: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _linear(path, hf_name, in_dim, out_shape):
    """HF weight [prod(out), in] <-> Kestrel [in, *out] (q/k/v projections and the MLP's gate/up)."""
    out = int(np.prod(out_shape))
    return ParamSpec(path, hf_name, (in_dim, *out_shape), (out, in_dim),
                     lambda w: w.T.reshape(in_dim, *out_shape),
                     lambda w: w.reshape(in_dim, out).T)


def _linear_out(path, hf_name, in_shape, out_dim):
    """HF weight [out, prod(in)] <-> Kestrel [*in, out] (o_proj and the MLP's down)."""
    inner = int(np.prod(in_shape))
    return ParamSpec(path, hf_name, (*in_shape, out_dim), (out_dim, inner),
                     lambda w: w.T.reshape(*in_shape, out_dim),
                     lambda w: w.reshape(inner, out_dim).T)


def _vector(path, hf_name, shape):
    size = int(np.prod(shape))
    return ParamSpec(path, hf_name, tuple(shape), (size,),
                     lambda w: w.reshape(shape), lambda w: w.reshape(size))


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every Kestrel parameter of cfg with its HF counterpart, in a stable order."""
    d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    specs = [ParamSpec("embed/table", "model.embed_tokens.weight", (v, d), (v, d), _same, _same)]
    # Gemma names its pre-MLP norm differently and adds post norms; others have two norms.
    if cfg.post_norms:
        norms = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    else:
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i in range(cfg.num_layers):
        p, hf = f"blocks/{i}", f"model.layers.{i}"
        specs += [
            _linear(f"{p}/attn/q_proj", f"{hf}.self_attn.q_proj.weight", d, (n, h)),
            _linear(f"{p}/attn/k_proj", f"{hf}.self_attn.k_proj.weight", d, (k, h)),
            _linear(f"{p}/attn/v_proj", f"{hf}.self_attn.v_proj.weight", d, (k, h)),
            _linear_out(f"{p}/attn/o_proj", f"{hf}.self_attn.o_proj.weight", (n, h), d),
        ]
        if cfg.attention_bias:
            specs += [
                _vector(f"{p}/attn/q_bias", f"{hf}.self_attn.q_proj.bias", (n, h)),
                _vector(f"{p}/attn/k_bias", f"{hf}.self_attn.k_proj.bias", (k, h)),
                _vector(f"{p}/attn/v_bias", f"{hf}.self_attn.v_proj.bias", (k, h)),
            ]
        if cfg.qk_norm:
            specs += [
                _vector(f"{p}/attn/q_norm/scale", f"{hf}.self_attn.q_norm.weight", (h,)),
                _vector(f"{p}/attn/k_norm/scale", f"{hf}.self_attn.k_norm.weight", (h,)),
            ]
        specs += [
            _linear(f"{p}/mlp/gate", f"{hf}.mlp.gate_proj.weight", d, (f,)),
            _linear(f"{p}/mlp/up", f"{hf}.mlp.up_proj.weight", d, (f,)),
            _linear_out(f"{p}/mlp/down", f"{hf}.mlp.down_proj.weight", (f,), d),
        ]
        specs += [_vector(f"{p}/{ours}/scale", f"{hf}.{theirs}.weight", (d,))
                  for ours, theirs in norms.items()]
    specs.append(_vector("final_norm/scale", "model.norm.weight", (d,)))
    if not cfg.tie_embeddings:
        specs.append(ParamSpec("lm_head", "lm_head.weight", (v, d), (v, d), _same, _same))
    if cfg.vision is not None:
        specs += hf_vision.vision_specs(cfg.vision, d, ParamSpec, _linear, _linear_out, _vector)
    return specs


# Tensors a source may carry that hold nothing the model needs (buffers, tied copies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def params_from_hf(cfg: ModelConfig, names: Iterable[str], read: Callable[[str], np.ndarray],
                   dtype) -> dict[str, np.ndarray]:
    """Kestrel parameters {path: array} from HF tensors, checking names and shapes.

    Args:
      cfg: the model's config.
      names: every tensor name the source holds.
      read: reads one tensor by HF name (float, any precision).
      dtype: numpy dtype of the result.

    Raises:
      KestrelError: a missing tensor, a tensor of the wrong shape, or a tensor the model has no
        place for.
    """
    if cfg.vision is not None:
        # Multimodal folders spell the same tensors several ways: read them by canonical name.
        source_name = {hf_vision.canonical_name(n): n for n in names}
        names, source_read = set(source_name), read
        read = lambda name: source_read(source_name[name])  # noqa: E731
    names = set(names)
    specs = param_specs(cfg)
    wanted = {s.hf_name for s in specs}
    # A tied model may still carry lm_head.weight (a copy of the embeddings): not an error.
    extra = sorted(n for n in names - wanted if not n.endswith(_IGNORED_SUFFIXES)
                   and not n.startswith(hf_vision.UNUSED_PREFIXES)
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise KestrelError(f"tensor {extra[0]!r}{more} has no place in the {cfg.architecture} model")
    out = {}
    for spec in specs:
        if spec.hf_name not in names:
            raise KestrelError(f"missing tensor {spec.hf_name!r} (needed for {spec.path})")
        w = read(spec.hf_name)
        if tuple(w.shape) != spec.hf_shape:
            raise KestrelError(f"tensor {spec.hf_name!r} has shape {tuple(w.shape)}, "
                               f"expected {spec.hf_shape}")
        out[spec.path] = np.ascontiguousarray(spec.to_kestrel(w.astype(np.float32))).astype(dtype)
    return out


def params_to_hf(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors {name: array} from flat Kestrel parameters {path: array}."""
    return {s.hf_name: np.ascontiguousarray(s.to_hf(np.asarray(params[s.path])))
            for s in param_specs(cfg)}
