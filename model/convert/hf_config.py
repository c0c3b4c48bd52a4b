"""Hugging Face ``config.json`` <-> ModelConfig for the families Kestrel converts.

Reads both transformers 5 configs (RoPE in ``rope_parameters``, per layer type for Gemma 3) and
transformers 4 ones (``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``). Anything the
model cannot reproduce exactly (biases it has no place for, partial rotary, unknown RoPE types or
activations, bidirectional attention) is refused with a message naming the field.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from kestrel.errors import KestrelError
from model.config import ModelConfig, RopeScaling
from model.convert import hf_vision

# model_type -> (family name kept in ModelConfig.architecture, HF architecture class).
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_ARCH_TO_TYPE = {arch: family for family, arch in FAMILIES.items()}
SUPPORTED = ", ".join([f"{arch} ({family})" for family, arch in FAMILIES.items()]
                      + [f"{hf_vision.MULTIMODAL_ARCH} ({hf_vision.MULTIMODAL_TYPE})"])

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# Class defaults of transformers' configs for fields a saved config.json may omit.
_DEFAULT_TIED = {"llama": False, "qwen2": False, "qwen3": False, "gemma3_text": True}
_DEFAULT_THETA = {"llama": 10_000.0, "qwen2": 10_000.0, "qwen3": 10_000.0, "gemma3_text": 1_000_000.0}
_ROPE_KEYS = {f.name for f in RopeScaling.__dataclass_fields__.values()} - {"type"}


def hf_family(hf: dict[str, Any]) -> str:
    """The family (a key of FAMILIES) of an HF config dict, or a KestrelError naming what is supported."""
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in hf.get("architectures") or ():
        if arch in _ARCH_TO_TYPE:
            return _ARCH_TO_TYPE[arch]
    found = model_type or ",".join(hf.get("architectures") or ()) or "none given"
    raise KestrelError(f"unsupported architecture {found!r} in config.json; supported: {SUPPORTED}")


def _rope_scaling(params: dict[str, Any] | None, where: str) -> tuple[float | None, RopeScaling]:
    """(rope_theta or None, RopeScaling) from one HF rope dict."""
    if not params:
        return None, RopeScaling()
    params = dict(params)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise KestrelError(f"{where}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise KestrelError(f"{where}: rope type {kind!r} is not supported; "
                           "supported: default, linear, llama3, yarn")
    if kind == "default":
        return theta, RopeScaling()
    unknown = sorted(k for k, v in params.items() if k not in _ROPE_KEYS and v is not None)
    if unknown:
        raise KestrelError(f"{where}: rope fields {unknown} are not supported for rope type {kind}")
    kwargs = {k: v for k, v in params.items() if v is not None}
    if kind == "linear":
        kwargs = {"factor": float(kwargs.get("factor", 1.0))}
    try:
        return theta, RopeScaling(type=kind, **kwargs)
    except (TypeError, ValueError) as e:
        raise KestrelError(f"{where}: invalid rope scaling {params}: {e}") from None


def _ropes(hf: dict[str, Any], family: str) -> tuple[float, RopeScaling, float | None]:
    """(global theta, global scaling, local theta or None) from either transformers version."""
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise KestrelError(f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported (only 1.0)")
    params = hf.get("rope_parameters")
    if family == "gemma3_text":
        nested = params if params and ("full_attention" in params or "sliding_attention" in params) else None
        full = dict((nested or {}).get("full_attention") or {})
        if not nested:
            full.update(hf.get("rope_scaling") or params or {})
        local = dict((nested or {}).get("sliding_attention") or {})
        theta, scaling = _rope_scaling(full, "rope_parameters.full_attention")
        local_theta, local_scaling = _rope_scaling(local, "rope_parameters.sliding_attention")
        if local_scaling.type != "default":
            raise KestrelError("rope_parameters.sliding_attention: scaled local RoPE "
                               f"({local_scaling.type}) is not supported")
        theta = theta or hf.get("rope_theta") or _DEFAULT_THETA[family]
        local_theta = local_theta or hf.get("rope_local_base_freq") or 10_000.0
        return float(theta), scaling, float(local_theta)
    merged = dict(params or {})
    if not params:
        merged.update(hf.get("rope_scaling") or {})
    theta, scaling = _rope_scaling(merged, "rope_parameters")
    if scaling.type in ("llama3", "yarn") and scaling.original_max_position_embeddings is None:
        # transformers fills it from max_position_embeddings when the dict omits it.
        scaling = RopeScaling(**{**scaling.__dict__, "original_max_position_embeddings":
                                 hf.get("original_max_position_embeddings",
                                        hf.get("max_position_embeddings", 8192))})
    theta = theta or hf.get("rope_theta") or _DEFAULT_THETA[family]
    return float(theta), scaling, None


def _layer_types(hf: dict[str, Any], family: str, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    types = hf.get("layer_types")
    # 4096 is the class default of Gemma3TextConfig, Qwen2Config and Qwen3Config.
    window = hf.get("sliding_window", 4096 if family != "llama" else None)
    if types is None:
        if family == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(num_layers)]
        elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
            first = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["full_attention"] * num_layers
    mapping = {"full_attention": "global", "sliding_attention": "sliding"}
    bad = sorted({t for t in types if t not in mapping})
    if bad:
        raise KestrelError(f"layer_types {bad} are not supported; use full_attention or sliding_attention")
    out = tuple(mapping[t] for t in types)
    if "sliding" not in out:
        return out, None
    if not window:
        raise KestrelError("config has sliding_attention layers but no sliding_window")
    return out, int(window)


def _activation(hf: dict[str, Any], family: str) -> str:
    name = hf.get("hidden_activation") if family == "gemma3_text" else None
    name = name or hf.get("hidden_act") or ("gelu_pytorch_tanh" if family == "gemma3_text" else "silu")
    if name not in _ACTIVATIONS:
        raise KestrelError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def model_config_from_hf(hf: dict[str, Any], *, dtype: str = "float32",
                         preprocessor: dict[str, Any] | None = None) -> ModelConfig:
    """A ModelConfig reproducing an HF config dict exactly, or a KestrelError saying what it cannot.

    Args:
      hf: the parsed ``config.json``.
      dtype: parameter and compute dtype of the converted model.
      preprocessor: the parsed ``preprocessor_config.json`` of a multimodal folder (image
        normalisation), or None for its defaults.
    """
    if hf_vision.is_multimodal(hf):
        text = model_config_from_hf(hf_vision.text_config(hf), dtype=dtype)
        return text.replace(vision=hf_vision.vision_config_from_hf(hf, preprocessor),
                            architecture=hf_vision.MULTIMODAL_TYPE)
    family = hf_family(hf)
    if family != "qwen2" and hf.get("attention_bias"):
        raise KestrelError(f"{family}: attention_bias=true puts a bias on o_proj, which Kestrel's "
                           "attention does not have")
    if hf.get("mlp_bias"):
        raise KestrelError(f"{family}: mlp_bias=true is not supported (Kestrel's MLP has no biases)")
    if hf.get("use_bidirectional_attention"):
        raise KestrelError(f"{family}: use_bidirectional_attention=true is not supported")
    try:
        d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        fields = dict(vocab_size=int(hf["vocab_size"]), hidden_size=d, num_layers=layers,
                      num_heads=n, intermediate_size=int(hf["intermediate_size"]))
    except KeyError as e:
        raise KestrelError(f"config.json has no {e.args[0]!r}") from None
    theta, scaling, local_theta = _ropes(hf, family)
    layer_types, window = _layer_types(hf, family, layers)
    gemma = family == "gemma3_text"
    query_scale = None
    if gemma:
        query_scale = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
        if hf.get("attn_logit_softcapping") is not None:
            # transformers' Gemma3Attention stores this field but never applies it (Gemma 3
            # replaced soft-capping with q/k norm); follow the reference implementation.
            warnings.warn("gemma3_text: attn_logit_softcapping is ignored, as transformers does")
    try:
        return ModelConfig(
            **fields,
            num_kv_heads=int(hf.get("num_key_value_heads") or n),
            head_dim=int(hf.get("head_dim") or d // n),
            activation=_activation(hf, family),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm_plus_one=gemma,
            qk_norm=family in ("qwen3", "gemma3_text"),
            post_norms=gemma,
            attention_bias=family == "qwen2",
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=local_theta,
            layer_types=layer_types,
            sliding_window=window,
            tie_embeddings=bool(hf.get("tie_word_embeddings", _DEFAULT_TIED[family])),
            embed_scale=gemma,
            query_scale=query_scale,
            attn_logit_softcap=None,
            final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            dtype=dtype,
            param_dtype=dtype,
            architecture=family,
        )
    except ValueError as e:
        raise KestrelError(f"config.json cannot be represented: {e}") from None


def export_family(cfg: ModelConfig) -> str:
    """The HF family that represents cfg exactly (its source family when it came from one)."""
    if cfg.architecture in FAMILIES:
        return cfg.architecture
    if cfg.norm_plus_one or cfg.post_norms or cfg.embed_scale:
        family = "gemma3_text"
    elif cfg.attention_bias:
        family = "qwen2"
    elif cfg.qk_norm:
        family = "qwen3"
    else:
        family = "llama"
    return family


def _check_exportable(cfg: ModelConfig, family: str) -> None:
    gemma = family == "gemma3_text"
    wants = dict(norm_plus_one=gemma, post_norms=gemma, embed_scale=gemma,
                 qk_norm=family in ("qwen3", "gemma3_text"), attention_bias=family == "qwen2")
    for name, value in wants.items():
        if getattr(cfg, name) != value:
            raise KestrelError(f"cannot export to {FAMILIES[family]}: {name}={getattr(cfg, name)}")
    if cfg.attn_logit_softcap is not None:
        raise KestrelError(f"cannot export to {FAMILIES[family]}: transformers does not apply "
                           "attn_logit_softcap")
    if cfg.token_shift:
        raise KestrelError(f"cannot export to {FAMILIES[family]}: token_shift (the previous token "
                           "mixed into each input) has no transformers equivalent")
    if cfg.embedding_value_layers:
        raise KestrelError(f"cannot export to {FAMILIES[family]}: embedding_value_layers (attention "
                           "values read from the token embeddings) has no transformers equivalent")
    if cfg.pointer_dim:
        raise KestrelError(f"cannot export to {FAMILIES[family]}: pointer_dim (a copy distribution "
                           "over the context mixed into the output) has no transformers equivalent")
    if not gemma:
        for name in ("final_logit_softcap", "query_scale", "rope_local_theta"):
            if getattr(cfg, name) is not None:
                raise KestrelError(f"cannot export to {FAMILIES[family]}: {name} is set")


def _hf_rope(theta: float, scaling: RopeScaling) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": scaling.type, "rope_theta": theta}
    if scaling.type == "linear":
        out["factor"] = scaling.factor
    elif scaling.type == "llama3":
        out.update(factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                   high_freq_factor=scaling.high_freq_factor,
                   original_max_position_embeddings=scaling.original_max_position_embeddings)
    elif scaling.type == "yarn":
        out["factor"] = scaling.factor
        for name in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim", "attention_factor"):
            if getattr(scaling, name) is not None:
                out[name] = getattr(scaling, name)
        out["truncate"] = scaling.truncate
    return out


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers 5 ``config.json`` dict of cfg's family (see ``export_family``)."""
    if cfg.vision is not None:
        raise KestrelError("export of models with a vision tower is not supported yet "
                           f"(only import of {hf_vision.MULTIMODAL_ARCH})")
    family = export_family(cfg)
    _check_exportable(cfg, family)
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
        "layer_types": ["sliding_attention" if t == "sliding" else "full_attention"
                        for t in cfg.layer_types],
    }
    sliding = "sliding" in cfg.layer_types
    if family == "gemma3_text":
        hf.update(
            hidden_activation=_HF_ACTIVATION[cfg.activation],
            query_pre_attn_scalar=cfg.scale ** -2,
            attn_logit_softcapping=None,
            final_logit_softcapping=cfg.final_logit_softcap,
            sliding_window=cfg.sliding_window if sliding else None,
            attention_bias=False,
            rope_parameters={
                "full_attention": _hf_rope(cfg.rope_theta, cfg.rope_scaling),
                "sliding_attention": _hf_rope(cfg.rope_local_theta or cfg.rope_theta, RopeScaling()),
            },
        )
        if cfg.rope_local_theta is None and cfg.rope_scaling.type != "default" and sliding:
            raise KestrelError("cannot export to Gemma3ForCausalLM: sliding layers share a scaled RoPE")
        if not math.isclose(hf["query_pre_attn_scalar"], round(hf["query_pre_attn_scalar"])):
            raise KestrelError(f"cannot export query_scale={cfg.query_scale}: Gemma's "
                               "query_pre_attn_scalar must be an integer")
        hf["query_pre_attn_scalar"] = int(round(hf["query_pre_attn_scalar"]))
    else:
        hf.update(hidden_act=_HF_ACTIVATION[cfg.activation],
                  rope_parameters=_hf_rope(cfg.rope_theta, cfg.rope_scaling))
        if family == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        if family == "qwen3":
            hf["attention_bias"] = False
        if family in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None,
                      max_window_layers=cfg.layer_types.index("sliding") if sliding else cfg.num_layers)
        elif sliding:
            raise KestrelError("cannot export to LlamaForCausalLM: it has no sliding-window layers")
    return hf
