"""Reading a llama.cpp GGUF file as if it were a Hugging Face folder.

The metadata becomes an HF-style config dict and the tensors get their HF names, so the rest of
conversion is shared with safetensors sources. Quantized tensors are dequantized with
``gguf.quants.dequantize``; llama.cpp's q/k row permutation (made for its interleaved RoPE) is
undone so the rows match transformers' rotate-half layout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kestrel.errors import KestrelError

SUPPORTED_ARCHS = ("llama",)

# GGUF tensor name (block index replaced by {i}) -> HF name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of q/k projection rows [N*H, D] for n_head heads."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py): rotate-half rows -> interleaved rows."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF file's config (HF-style dict) and tensors (HF names, dequantized float32)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except ValueError as e:
            # An unknown tensor type id fails inside the reader before any tensor is named.
            raise KestrelError(f"{path.name}: cannot read GGUF file: {e}") from None
        except (OSError, IndexError) as e:
            raise KestrelError(f"{path.name}: truncated or corrupt GGUF file: {e}") from None
        self.arch = self._field("general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise KestrelError(f"{path.name}: unsupported GGUF architecture {self.arch!r}; "
                               f"supported: {', '.join(SUPPORTED_ARCHS)}")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise KestrelError(f"{path.name}: per-frequency RoPE factors (rope_freqs, llama3 "
                               "scaling) are not supported in GGUF; convert the HF folder instead")
        self.location: dict[str, str] = {}
        for name in self.tensors:
            hf = hf_name(name)
            # Unmapped tensors keep their GGUF name, so conversion reports them as extra.
            self.location[hf or name] = name
        self.config = self._hf_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, float):
            # GGUF stores float32: take the shortest decimal that rounds to it (1e-05, not
            # 9.99999974e-06), which is the value the model was configured with.
            value = float(str(np.float32(value)))
        return value

    def _hf_config(self) -> dict[str, Any]:
        a = self.arch
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise KestrelError(f"{self.path.name}: missing tensor 'token_embd.weight'")
        vocab, d = int(embed.shape[1]), int(embed.shape[0])  # GGUF shapes are innermost-first
        n = int(self._field(f"{a}.attention.head_count"))
        scaling_type = self._field(f"{a}.rope.scaling.type", "none")
        rope: dict[str, Any] = {"rope_type": "default"}
        if scaling_type == "linear":
            rope = {"rope_type": "linear", "factor": float(self._field(f"{a}.rope.scaling.factor"))}
        elif scaling_type not in ("none", None):
            raise KestrelError(f"{self.path.name}: GGUF rope scaling {scaling_type!r} is not supported")
        rope["rope_theta"] = float(self._field(f"{a}.rope.freq_base", 10_000.0))
        head_dim = int(self._field(f"{a}.attention.key_length", d // n))
        rot = self._field(f"{a}.rope.dimension_count", head_dim)
        if int(rot) != head_dim:
            raise KestrelError(f"{self.path.name}: partial rotary ({rot} of {head_dim} dims) "
                               "is not supported")
        return {
            "model_type": a,
            "vocab_size": int(self._field(f"{a}.vocab_size", vocab)),
            "hidden_size": int(self._field(f"{a}.embedding_length", d)),
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": n,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", n)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "max_position_embeddings": int(self._field(f"{a}.context_length", 8192)),
            "rope_parameters": rope,
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.model" in self.reader.fields

    @property
    def names(self) -> list[str]:
        return list(self.location)

    def read(self, name: str) -> np.ndarray:
        """The tensor with HF name ``name`` as float32 [rows, cols] in HF's row order."""
        tensor = self.tensors[self.location[name]]
        qtype = tensor.tensor_type
        try:
            if qtype == GGMLQuantizationType.F32:
                w = np.asarray(tensor.data, np.float32)
            elif qtype == GGMLQuantizationType.F16:
                w = np.asarray(tensor.data).astype(np.float32)
            else:
                w = dequantize(tensor.data, qtype).astype(np.float32)
        except NotImplementedError:
            raise KestrelError(f"{self.path.name}: unsupported quantization type "
                               f"{GGMLQuantizationType(qtype).name} for tensor {tensor.name!r}") from None
        # The reader gives numpy order already; shape is innermost-first ggml order.
        w = w.reshape(tuple(int(s) for s in reversed(tensor.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, self.config["num_key_value_heads"])
        return w
