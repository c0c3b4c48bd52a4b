"""Kestrel checkpoint folders: save and load a model (and its tokenizer) atomically.

A checkpoint folder holds::

    config.json     ModelConfig.to_dict()
    params/         an orbax checkpoint of nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kestrel.json    format version, source, parameter dtype
    tokenizer files written by model.tokenizer.Tokenizer.save (when there is a tokenizer)

Writes go to a hidden temporary sibling folder that is renamed into place at the end, so a
failure leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kestrel.errors import KestrelError
from model.config import ModelConfig
from model.layers import DTYPES
from model.quantization import check_quantization, quantize_model, tree_bytes
from model.transformer import Transformer

FORMAT_VERSION = 1
CONFIG = "config.json"
PARAMS = "params"
META = "kestrel.json"


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``out_dir`` only if the block succeeds.

    Raises:
      KestrelError: ``out_dir`` exists and ``force`` is False.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise KestrelError(f"output folder {out} already exists (pass force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)  # put the previous folder back
                raise
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path + "/"))
        else:
            out[path] = value
    return out


def flatten_params(tree: dict) -> dict[str, Any]:
    """{"blocks": {0: {"attn": {"q_proj": x}}}} -> {"blocks/0/attn/q_proj": x}."""
    return _flat(tree)


def nest_params(flat: dict[str, Any], like: dict) -> dict:
    """The inverse of ``flatten_params``, shaped like ``like`` (keeps integer block keys)."""
    out = {}
    for key, value in like.items():
        if isinstance(value, dict):
            sub = {p[len(f"{key}/"):]: v for p, v in flat.items() if p.startswith(f"{key}/")}
            out[key] = nest_params(sub, value)
        else:
            out[key] = flat[str(key)]
    return out


def _abstract_model(cfg: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree of a model with ``cfg`` as ShapeDtypeStructs (nothing allocated)."""
    return nnx.to_pure_dict(nnx.state(_abstract_model(cfg), nnx.Param))


def model_from_params(cfg: ModelConfig, params: dict) -> Transformer:
    """A Transformer for ``cfg`` holding ``params``.

    Args:
      cfg: the model's config.
      params: a pure-dict tree as ``abstract_params`` gives, or a flat {path: array} dict as
        ``flatten_params`` gives.
    """
    graphdef, state = nnx.split(_abstract_model(cfg))
    if params and all(isinstance(v, (jax.Array, np.ndarray)) for v in params.values()):
        params = nest_params(params, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save_checkpoint(model: Transformer, out_dir: str | Path, *, tokenizer=None,
                    source: dict[str, Any] | str | None = None, force: bool = False) -> Path:
    """Writes ``model`` (and ``tokenizer``) as a Kestrel checkpoint folder, atomically.

    Args:
      model: the model; its config and Param state are saved.
      out_dir: the checkpoint folder to create.
      tokenizer: a ``model.tokenizer.Tokenizer`` (anything with ``save(dir)``), or None.
      source: where the weights came from (recorded in kestrel.json).
      force: replace an existing ``out_dir``.

    Returns:
      The absolute checkpoint path.

    Raises:
      KestrelError: ``out_dir`` exists and ``force`` is False.
    """
    cfg = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with atomic_output_dir(out_dir, force=force) as tmp:
        (tmp / CONFIG).write_text(cfg.to_json() + "\n")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS, params)
            checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format_version": FORMAT_VERSION, "source": source, "dtype": cfg.param_dtype,
                "num_params": cfg.num_params, "quantization": cfg.quantization,
                "param_bytes": tree_bytes(params)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir).absolute()


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (KestrelError if it is not one)."""
    ckpt = Path(ckpt_dir)
    path = ckpt / CONFIG
    if not path.is_file() or not (ckpt / PARAMS).is_dir():
        raise KestrelError(f"{ckpt} is not a Kestrel checkpoint (needs {CONFIG} and {PARAMS}/)")
    try:
        return ModelConfig.from_json(path.read_text())
    except (ValueError, TypeError) as e:
        raise KestrelError(f"{path}: invalid model config: {e}") from None


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def restore_params(ckpt_dir: str | Path, target: dict | None = None) -> dict:
    """Restores the parameter tree, optionally onto ``target``'s shapes, dtypes and shardings.

    Args:
      ckpt_dir: the checkpoint folder.
      target: a pure-dict tree of ``jax.ShapeDtypeStruct`` (with ``sharding`` to place each
        array, e.g. for training on a mesh); defaults to the stored dtype on the default device.

    Returns:
      The pure-dict parameter tree (``nnx.replace_by_pure_dict`` accepts it).
    """
    stored_dtype = jnp.dtype(DTYPES[read_config(ckpt_dir).param_dtype])
    if target is None:
        target = abstract_params(read_config(ckpt_dir))
    # Restore in the stored dtype, then cast: a dtype change is a plain astype, never orbax's.
    # Integer leaves (int8 weights of a quantized model) are restored as they are.
    stored = lambda t: t.dtype if jnp.issubdtype(t.dtype, jnp.integer) else stored_dtype  # noqa: E731
    shapes = jax.tree.map(
        lambda t: jax.ShapeDtypeStruct(t.shape, stored(t), sharding=getattr(t, "sharding", None)),
        target)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(ckpt_dir).absolute() / PARAMS, shapes)
    return jax.tree.map(lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, restored, target)


def load_tokenizer(ckpt_dir: str | Path):
    """The checkpoint's tokenizer, or None when it has none (or model.tokenizer is absent)."""
    ckpt = Path(ckpt_dir)
    if not any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        from model.tokenizer import Tokenizer
    except ImportError:
        return None
    return Tokenizer.load(ckpt)


def load_checkpoint(ckpt_dir: str | Path, *, dtype: str | None = None,
                    quantize: str | None = None):
    """Loads a Kestrel checkpoint folder.

    Args:
      ckpt_dir: the folder ``save_checkpoint`` or ``convert_checkpoint`` wrote.
      dtype: parameter and compute dtype (``float32``, ``bfloat16``, ``float16``); default as saved.
      quantize: quantize a float checkpoint's weights at load (``int8``, ``int8-w8a8``); a
        checkpoint saved quantized loads quantized without it.

    Returns:
      (Transformer, Tokenizer or None).

    Raises:
      KestrelError: not a checkpoint; an unsupported ``quantize`` type; ``quantize`` differing
        from the quantization the checkpoint was saved with.
    """
    check_quantization(quantize)
    cfg = read_config(ckpt_dir)
    if quantize is not None and cfg.quantization not in (None, quantize):
        raise KestrelError(f"{ckpt_dir} is quantized {cfg.quantization}; it cannot be loaded as "
                           f"{quantize} (convert the float checkpoint instead)")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(_abstract_model(cfg))
    params = restore_params(ckpt_dir, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if quantize is not None and cfg.quantization is None:
        model = quantize_model(model, quantize)
    return model, load_tokenizer(ckpt_dir)
