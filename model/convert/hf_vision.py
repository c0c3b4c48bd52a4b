"""Gemma 3 multimodal checkpoints (``Gemma3ForConditionalGeneration``): config and tensor names.

A multimodal folder nests the text model's config under ``text_config`` and SigLIP's under
``vision_config``; its tensors carry the text model under ``language_model.`` and the tower under
``vision_tower.`` (transformers 5 saves ``language_model.model.*`` and ``vision_tower.*``; hub
checkpoints also use ``vision_tower.vision_model.*`` and ``model.language_model.*``). Names are
brought to one canonical form (text tensors as a causal LM names them), so the text model's
table in ``hf_weights`` is reused unchanged and only the tower's table lives here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kestrel.errors import KestrelError
from model.vision_config import VisionConfig

MULTIMODAL_TYPE = "gemma3"
MULTIMODAL_ARCH = "Gemma3ForConditionalGeneration"
# SiglipVisionConfig's class defaults, for fields a saved vision_config may omit.
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
# Tensors of SigLIP's attention-pooling head: Gemma 3 uses the patch features, never the head.
UNUSED_PREFIXES = ("vision_tower.head.",)


def is_multimodal(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == MULTIMODAL_TYPE or MULTIMODAL_ARCH in (hf.get("architectures") or ())


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config dict of a multimodal config (as a Gemma3ForCausalLM would have it)."""
    text = dict(hf.get("text_config") or {})
    if not text:
        raise KestrelError(f"{MULTIMODAL_ARCH} config.json has no text_config")
    text.setdefault("model_type", "gemma3_text")
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    return text


def _int(d: dict[str, Any], key: str) -> int:
    value = d.get(key, _SIGLIP_DEFAULTS.get(key))
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise KestrelError(f"vision_config.{key}={value}: only square sizes are supported")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> VisionConfig:
    """The VisionConfig of a Gemma 3 multimodal config (and its preprocessor_config.json)."""
    vision = dict(hf.get("vision_config") or {})
    if not vision:
        raise KestrelError(f"{MULTIMODAL_ARCH} config.json has no vision_config")
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise KestrelError(f"vision_config.model_type {vision['model_type']!r} is not supported; "
                           "supported: siglip_vision_model")
    act = vision.get("hidden_act", _SIGLIP_DEFAULTS["hidden_act"])
    if act not in _ACTIVATIONS:
        raise KestrelError(f"vision_config.hidden_act {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    image_id = hf.get("image_token_index", hf.get("image_token_id"))
    if image_id is None:
        raise KestrelError(f"{MULTIMODAL_ARCH} config.json has no image_token_index")
    pre = preprocessor or {}
    if pre.get("do_pan_and_scan"):
        raise KestrelError("preprocessor_config.json: do_pan_and_scan is not supported")
    try:
        return VisionConfig(
            hidden_size=_int(vision, "hidden_size"),
            intermediate_size=_int(vision, "intermediate_size"),
            num_layers=_int(vision, "num_hidden_layers"),
            num_heads=_int(vision, "num_attention_heads"),
            image_size=_int(vision, "image_size"),
            patch_size=_int(vision, "patch_size"),
            num_channels=_int(vision, "num_channels"),
            norm_eps=float(vision.get("layer_norm_eps", _SIGLIP_DEFAULTS["layer_norm_eps"])),
            activation=_ACTIVATIONS[act],
            mm_tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
            image_token_id=int(image_id),
            image_start_id=hf.get("boi_token_index", hf.get("boi_token_id")),
            image_end_id=hf.get("eoi_token_index", hf.get("eoi_token_id")),
            image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        )
    except ValueError as e:
        raise KestrelError(f"vision_config cannot be represented: {e}") from None


def read_preprocessor(src: Path) -> dict[str, Any] | None:
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KestrelError(f"{path} is not valid JSON: {e}") from None


def canonical_name(name: str) -> str:
    """A multimodal tensor name in canonical form: text as ``model.*`` / ``lm_head.*``, the tower
    as ``vision_tower.*``, the projector as ``multi_modal_projector.*``."""
    for prefix in ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector."):
        if name.startswith(prefix):
            name = name[len("model."):]
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    if name.startswith("language_model."):
        return "model." + name[len("language_model."):]
    if name.startswith("vision_tower.vision_model."):
        return "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


def vision_specs(v: VisionConfig, text_width: int, spec, linear, linear_out, vector) -> list:
    """ParamSpecs of the tower and projector; the layout helpers come from ``hf_weights``."""
    e, f, n, h, p, c = (v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim, v.patch_size,
                        v.num_channels)
    t = "vision_tower"
    # Conv2d weight [E, C, p, p] <-> matmul weight over (y, x, c)-flattened patches [p*p*C, E].
    specs = [
        spec("vision/patch_embed", f"{t}.embeddings.patch_embedding.weight", (p * p * c, e), (e, c, p, p),
             lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, e),
             lambda w: w.reshape(p, p, c, e).transpose(3, 2, 0, 1)),
        vector("vision/patch_bias", f"{t}.embeddings.patch_embedding.bias", (e,)),
        spec("vision/position_embed", f"{t}.embeddings.position_embedding.weight",
             (v.num_patches, e), (v.num_patches, e), np.asarray, np.asarray),
    ]
    for i in range(v.num_layers):
        ours, hf = f"vision/blocks/{i}", f"{t}.encoder.layers.{i}"
        for name in ("q", "k", "v"):
            specs += [linear(f"{ours}/{name}_proj", f"{hf}.self_attn.{name}_proj.weight", e, (n, h)),
                      vector(f"{ours}/{name}_bias", f"{hf}.self_attn.{name}_proj.bias", (n, h))]
        specs += [
            linear_out(f"{ours}/o_proj", f"{hf}.self_attn.out_proj.weight", (n, h), e),
            vector(f"{ours}/o_bias", f"{hf}.self_attn.out_proj.bias", (e,)),
            linear(f"{ours}/fc1", f"{hf}.mlp.fc1.weight", e, (f,)),
            vector(f"{ours}/fc1_bias", f"{hf}.mlp.fc1.bias", (f,)),
            linear_out(f"{ours}/fc2", f"{hf}.mlp.fc2.weight", (f,), e),
            vector(f"{ours}/fc2_bias", f"{hf}.mlp.fc2.bias", (e,)),
        ]
        for norm, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
            specs += [vector(f"{ours}/{norm}/scale", f"{hf}.{theirs}.weight", (e,)),
                      vector(f"{ours}/{norm}/bias", f"{hf}.{theirs}.bias", (e,))]
    specs += [
        vector("vision/post_norm/scale", f"{t}.post_layernorm.weight", (e,)),
        vector("vision/post_norm/bias", f"{t}.post_layernorm.bias", (e,)),
        vector("vision/soft_norm/scale", "multi_modal_projector.mm_soft_emb_norm.weight", (e,)),
        spec("vision/projection", "multi_modal_projector.mm_input_projection_weight",
             (e, text_width), (e, text_width), np.asarray, np.asarray),
    ]
    return specs
