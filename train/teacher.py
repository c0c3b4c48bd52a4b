"""Loading a distillation teacher: any converted Kestrel checkpoint with the student's tokenizer.

A Kestrel checkpoint folder holds ``config.json`` (``ModelConfig.to_dict()``) and ``params/`` (an
orbax checkpoint of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``), as ``model/convert``
writes it. The teacher is restored straight onto the training mesh with the student's sharding
rules, so it is never materialised whole on one device. ``initial_params`` reads a checkpoint
the same way to start a run from it (``RunConfig.init_from``: fine-tuning).
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from kestrel.errors import KestrelError
from model.config import ModelConfig
from model.transformer import init_model
from sharding.rules import param_shardings


def check_teacher(path: str | pathlib.Path, student: ModelConfig,
                  role: str = "distill.teacher") -> ModelConfig:
    """Validates a teacher folder without reading its weights; returns its config.

    ``role`` names the setting in error messages (``init_from`` reads checkpoints this way too).

    Raises:
      KestrelError: the folder, its config or its parameters are missing, or its vocabulary
        differs from the student's (a different tokenizer).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise KestrelError(f"{role} {str(path)!r} does not exist or is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise KestrelError(f"{role} {str(path)!r} has no config.json: not a converted "
                           "Kestrel checkpoint (convert it with `kestrel convert`)")
    if not (path / "params").is_dir():
        raise KestrelError(f"{role} {str(path)!r} has no params/ folder")
    try:
        cfg = ModelConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise KestrelError(f"{role} {str(config_file)!r} is not a valid model config: {e}") from e
    if cfg.vocab_size != student.vocab_size:
        raise KestrelError(
            f"{role} has vocab_size {cfg.vocab_size} but the student has "
            f"{student.vocab_size}: it must use the student's tokenizer")
    return cfg


def load_teacher(path: str | pathlib.Path, student: ModelConfig, rules, mesh,
                 compute_dtype: str, role: str = "distill.teacher") -> tuple[nnx.GraphDef, dict]:
    """The teacher's graph definition and parameters, sharded on ``mesh`` by ``rules``.

    Returns:
      (graphdef, params as a pure dict of sharded arrays).
    """
    cfg = check_teacher(path, student, role).replace(dtype=compute_dtype)
    abstract = nnx.eval_shape(lambda: init_model(cfg, 0))
    graphdef, abstract_state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(abstract_state, rules, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), shardings)
    try:
        params = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute() / "params", target)
    except Exception as e:
        raise KestrelError(f"{role} {str(path)!r}: cannot read params/ "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return graphdef, params


def save_teacher(model, path: str | pathlib.Path) -> None:
    """Writes ``model`` as a minimal Kestrel checkpoint (config.json + params/), for tests."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(model.config.to_json())
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    ckpt.wait_until_finished()


def initial_params(path: str | pathlib.Path, params: dict, student: ModelConfig, rules, mesh,
                   compute_dtype: str, report=print) -> dict:
    """``params`` (a fresh initialisation) with every parameter the checkpoint at ``path`` holds
    replaced by the checkpoint's (``RunConfig.init_from``).

    Raises:
      KestrelError: the checkpoint has a parameter the student lacks or one of another shape
        (a different architecture), or cannot be read.
    """
    _, loaded = load_teacher(path, student, rules, mesh, compute_dtype, role="init_from")
    ours = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    theirs = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    name = jax.tree_util.keystr
    for key, value in theirs.items():
        if key not in ours:
            raise KestrelError(f"init_from {str(path)!r} has parameter {name(key)} that the model "
                               "lacks: a different architecture")
        if value.shape != ours[key].shape:
            raise KestrelError(f"init_from {str(path)!r}: {name(key)} has shape {value.shape}, the "
                               f"model's is {ours[key].shape}")
    fresh = [name(k) for k in ours if k not in theirs]
    report(f"init_from {path}: {len(theirs)} parameters loaded"
           + (f"; {len(fresh)} keep their initialisation ({', '.join(fresh[:4])}"
              f"{', ...' if len(fresh) > 4 else ''})" if fresh else ""))
    merged = {k: theirs[k].astype(v.dtype) if k in theirs else v for k, v in ours.items()}
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [merged[k] for k in ours])
