"""``convert_checkpoint``: a Hugging Face folder or a GGUF file -> a Kestrel checkpoint folder."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kestrel.errors import KestrelError
from model.checkpoint import model_from_params, save_checkpoint
from model.quantization import check_quantization, quantize_model
from model.convert.gguf_source import GGUFSource
from model.convert.hf_config import model_config_from_hf
from model.convert.hf_vision import read_preprocessor
from model.convert.hf_weights import params_from_hf
from model.convert.safetensors_source import SafetensorsFolder, read_hf_config
from model.layers import DTYPES

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16")
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _tokenizer(src: Path, source):
    """The source's tokenizer, or None with a warning saying why there is none."""
    is_gguf = isinstance(source, GGUFSource)
    if is_gguf and not source.has_tokenizer:
        warnings.warn(f"{src.name} has no tokenizer metadata; the checkpoint will have no tokenizer",
                      stacklevel=3)
        return None
    if not is_gguf and not any((src / name).is_file() for name in _HF_TOKENIZER_FILES):
        warnings.warn(f"{src} has no tokenizer files; the checkpoint will have no tokenizer",
                      stacklevel=3)
        return None
    try:
        from model.tokenizer import Tokenizer
    except ImportError:
        warnings.warn("model.tokenizer is not available; the checkpoint will have no tokenizer",
                      stacklevel=3)
        return None
    return Tokenizer.from_gguf(source.reader) if is_gguf else Tokenizer.from_hf_dir(src)


def convert_checkpoint(src: str | Path, out: str | Path, *, dtype: str = "float32",
                       force: bool = False, quantize: str | None = None) -> Path:
    """Converts a Hugging Face model folder or a ``.gguf`` file into a Kestrel checkpoint.

    Args:
      src: an HF folder (config.json, *.safetensors, sharded or not, tokenizer files) of a
        supported family (Llama, Qwen2, Qwen3, Gemma 3 text, Gemma 3 multimodal), or a llama GGUF file.
      out: the checkpoint folder to write (config.json, params/, kestrel.json, tokenizer files).
      dtype: ``float32`` or ``bfloat16``, for parameters and compute.
      force: replace an existing ``out``.
      quantize: write int8 weights (``int8`` or ``int8-w8a8``, see ``model/quantization.py``);
        ``dtype`` is then the dtype of the scales and of the compute.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      KestrelError: an unsupported ``quantize`` type; the source is missing, unreadable or of an unsupported architecture, a tensor
        is missing or misshapen, or ``out`` exists without ``force``.
    """
    src, out = Path(src), Path(out)
    check_quantization(quantize)
    if dtype not in DTYPE_CHOICES:
        raise KestrelError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if out.exists() and not force:
        raise KestrelError(f"output folder {out} already exists (pass force to overwrite)")
    if not src.exists():
        raise KestrelError(f"source {src} does not exist")
    is_gguf = src.is_file()
    if is_gguf:
        if src.suffix != ".gguf":
            raise KestrelError(f"source {src} is a file but not a .gguf file")
        source = GGUFSource(src)
        cfg = model_config_from_hf(source.config, dtype=dtype)
    else:
        # The config is checked before any shard is opened: an unsupported model fails fast.
        cfg = model_config_from_hf(read_hf_config(src), dtype=dtype,
                                   preprocessor=read_preprocessor(src))
        source = SafetensorsFolder(src)
    flat = params_from_hf(cfg, source.names, source.read, np.dtype(DTYPES[dtype]))
    # pop: hold each tensor once (numpy or device), not twice, while moving it over.
    model = model_from_params(cfg, {k: jnp.asarray(flat.pop(k)) for k in list(flat)})
    if quantize is not None:
        model = quantize_model(model, quantize)
    tokenizer = _tokenizer(src, source)
    record = {"path": str(src.absolute()), "format": "gguf" if is_gguf else "safetensors",
              "architecture": cfg.architecture, "quantization": quantize}
    path = save_checkpoint(model, out, tokenizer=tokenizer, source=record, force=force)
    log.info("converted %s (%s, %s) to %s", src, cfg.architecture, dtype, path)
    return path
