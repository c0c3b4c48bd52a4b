"""The frozen configuration of Kestrel's decoder-only transformer family.

One dataclass covers Llama (incl. SmolLM2), Qwen2, Qwen3, Gemma 3 text and Kestrel's own models:
every architectural difference between them is a field here, checked in ``__post_init__``, so
the model code has no per-family branches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

from model.vision_config import VisionConfig

RopeType = Literal["default", "linear", "llama3", "yarn"]
LayerType = Literal["global", "sliding"]
Activation = Literal["silu", "gelu_tanh", "gelu"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are scaled for long context (Hugging Face's ``rope_scaling``).

    Attributes:
      type: ``default`` (none), ``linear`` (positions divided by ``factor``), ``llama3``
        (frequency-dependent interpolation), ``yarn`` (NTK-by-parts plus an attention factor).
      factor: the context extension factor.
      original_max_position_embeddings: the pre-training context (llama3 and yarn).
      low_freq_factor, high_freq_factor: llama3's band edges.
      beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate: yarn's knobs,
        named as in transformers; ``None`` takes transformers' defaults.
    """

    type: RopeType = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(
                f"rope scaling type {self.type!r} is not supported; "
                "supported: default, linear, llama3, yarn"
            )
        if self.type != "default" and not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.type == "llama3" and self.original_max_position_embeddings is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Dimension letters follow DESIGN.md (D, N, K, H, F, V, L).

    Attributes:
      vocab_size: V.
      hidden_size: D, the residual width.
      num_layers: L.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (GQA); N must be a multiple of K.
      head_dim: H.
      intermediate_size: F, the gated MLP's width.
      activation: the gate's nonlinearity: ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU).
      norm_eps: RMSNorm epsilon.
      norm_plus_one: Gemma's RMSNorm form ``x * (1 + w)`` instead of ``x * w``.
      qk_norm: RMSNorm over each head's queries and keys (Qwen3, Gemma 3).
      post_norms: Gemma's sandwich norms after attention and after the MLP.
      attention_bias: biases on the q/k/v projections (Qwen2).
      rope_theta: RoPE base of global layers.
      rope_scaling: scaling of global layers' frequencies.
      rope_local_theta: RoPE base of sliding layers (Gemma 3: 10,000, unscaled); ``None``
        shares the global base and scaling.
      layer_types: per layer, ``global`` (full causal) or ``sliding`` (left window).
      sliding_window: W; a sliding layer's query sees keys with ``q_pos - k_pos < W``.
      tie_embeddings: the output projection reuses the embedding table.
      embed_scale: multiply embeddings by sqrt(D) (Gemma).
      query_scale: softmax scale; ``None`` means ``1/sqrt(H)``.
      attn_logit_softcap: tanh soft-cap on attention logits, or ``None``.
      final_logit_softcap: tanh soft-cap on output logits, or ``None``.
      max_position_embeddings: the context the model is configured for.
      dtype: compute dtype of activations (parameters are kept in ``param_dtype``).
      param_dtype: storage dtype of parameters.
      architecture: the family this config came from (informational, kept for export).
      vision: the image tower (SigLIP + projector) when the model takes images, else None.
      exit_layers: early exit (LayerSkip / CALM): after each of these layers (1-based counts of
        blocks run, increasing, each < L) an exit head reads the hidden state. The head is the
        model's own final norm and (tied) LM head, so exits add no parameters; training adds their
        cross entropy (``RunConfig.early_exit_weight``), serving may stop there when confident.
      token_shift: the input of each position also carries the previous token's embedding through
        a learned map (``model/token_shift.py``), so one attention head can copy from the
        context; callers with a KV cache then pass ``prev_tokens``. Kestrel's own models only (no
        transformers equivalent).
      embedding_value_layers: layers (0-based) whose attention values are projected from each
        position's own token embedding (RMS-normed) instead of the residual stream: copy heads.
        Their queries and keys still read the contextual residual (where to copy from), their
        values carry only which token sits there (what to copy), so a head's output is the
        attended token's identity, ready for the tied LM head (a copy head as an ordinary cached
        attention layer; ``pointer_dim`` writes the copied token directly). Kestrel's own
        models only.
      pointer_dim: width of the pointer's queries and keys (``model/pointer.py``): the output
        distribution mixed with a copy distribution over the context's tokens, through a learned
        gate. 0 (default): no pointer. Kestrel's own models only.
      quantization: ``None`` (float weights), ``int8`` (int8 weights, float compute) or
        ``int8-w8a8`` (int8 weights and activations); see ``model/quantization.py``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: Activation = "silu"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    attention_bias: bool = False
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()
    rope_local_theta: float | None = None
    layer_types: tuple[LayerType, ...] | None = None
    sliding_window: int | None = None
    tie_embeddings: bool = True
    embed_scale: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 8192
    dtype: str = "float32"
    param_dtype: str = "float32"
    architecture: str = "kestrel"
    vision: VisionConfig | None = None
    exit_layers: tuple[int, ...] = ()
    token_shift: bool = False
    embedding_value_layers: tuple[int, ...] = ()
    pointer_dim: int = 0
    quantization: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"ModelConfig.activation {self.activation!r}: use silu, gelu_tanh or gelu")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("global",) * self.num_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"ModelConfig.layer_types has {len(self.layer_types)} entries for "
                f"{self.num_layers} layers"
            )
        bad = {t for t in self.layer_types if t not in ("global", "sliding")}
        if bad:
            raise ValueError(f"ModelConfig.layer_types: unknown {sorted(bad)}; use global or sliding")
        if "sliding" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError("ModelConfig.sliding_window must be >= 1 when a layer is sliding")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelConfig.{name} must be float32, bfloat16 or float16")
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig.from_dict(self.vision))
        self._increasing_layers("exit_layers", 1, self.num_layers - 1,
                                "layer counts", " (an exit after the last layer is the model)")
        if not isinstance(self.pointer_dim, int) or self.pointer_dim < 0:
            raise ValueError(f"ModelConfig.pointer_dim must be an integer >= 0 (0: no pointer), "
                             f"got {self.pointer_dim!r}")
        if self.pointer_dim and "global" not in self.layer_types:
            raise ValueError("ModelConfig.pointer_dim needs a global layer: the pointer copies from the "
                             "whole context, cached in the global layers' pages")
        self._increasing_layers("embedding_value_layers", 0, self.num_layers - 1, "layer indices")
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            raise ValueError(f"ModelConfig.vision must be a VisionConfig or None, got {self.vision!r}")
        if self.quantization is not None:
            from model.quantization import check_quantization

            check_quantization(self.quantization)

    def _increasing_layers(self, name: str, lo: int, hi: int, what: str, why: str = "") -> None:
        """Stores field `name` as a tuple, checked to be increasing ints in lo..hi."""
        values = tuple(getattr(self, name))
        object.__setattr__(self, name, values)
        if any(not isinstance(v, int) or not lo <= v <= hi for v in values) or list(values) != sorted(set(values)):
            raise ValueError(f"ModelConfig.{name} {list(values)} must be increasing {what} in {lo}..{hi}{why}")

    @property
    def scale(self) -> float:
        """Softmax scale applied to q·k."""
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, n, k, h, f, v = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                            self.intermediate_size, self.vocab_size)
        attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h if self.attention_bias else 0)
        norms = d * (4 if self.post_norms else 2) + (2 * h if self.qk_norm else 0)
        layer = attn + 3 * d * f + norms
        vision = 0 if self.vision is None else self.vision.num_params + self.vision.hidden_size * d
        shift = (d * d if self.token_shift else 0) + d * len(self.embedding_value_layers)
        pointer = 2 * d * self.pointer_dim + d + 1 if self.pointer_dim else 0
        return (self.num_layers * layer + v * d * (1 if self.tie_embeddings else 2) + d + vision
                + shift + pointer)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["exit_layers"] = list(self.exit_layers)
        out["embedding_value_layers"] = list(self.embedding_value_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if isinstance(data.get("vision"), dict):
            data["vision"] = VisionConfig.from_dict(data["vision"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
