"""Turns a training run into a Kestrel checkpoint folder that ``kestrel serve``/``eval`` load.

A training workdir holds orbax steps of the full training state (parameters, optimizer moments,
RNG, data position) under ``WORKDIR/checkpoints``; a Kestrel checkpoint is only the model (its
config, its parameters in the serving dtype) plus its tokenizer. This module restores the
newest step's parameters alone, onto the run config's model, and writes them with
``model.checkpoint.save_checkpoint`` next to the tokenizer the run trained on.

    python -m train.export runs/nano checkpoints/kestrel-nano --config configs/nano.py --force
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from kestrel.errors import KestrelError
from model.checkpoint import abstract_params, model_from_params, save_checkpoint
from model.layers import DTYPES
from train.checkpointing import TrainCheckpointer
from train.config import RunConfig, apply_overrides, load_config


def latest_step(workdir: str | pathlib.Path) -> int:
    """The newest committed training step in ``workdir/checkpoints``.

    Raises:
      KestrelError: the workdir has no committed checkpoint.
    """
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise KestrelError(f"{workdir} has no checkpoints/ folder; is it a training workdir?")
    ckpt = TrainCheckpointer(directory, keep=1 << 30, async_save=False)
    try:
        steps = ckpt.steps()
    finally:
        ckpt.manager.close()
    if not steps:
        raise KestrelError(f"{directory} holds no committed training checkpoint")
    return steps[-1]


def export_trained(workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                   tokenizer_dir: str | pathlib.Path | None = None, force: bool = False, *,
                   config: RunConfig | str | pathlib.Path, overrides: tuple[str, ...] | list[str] = (),
                   step: int | None = None, dtype: str = "float32") -> pathlib.Path:
    """Writes the newest (or a given) step of a training run as a Kestrel checkpoint folder.

    Args:
      workdir: the training workdir (``kestrel train --workdir``).
      out_dir: the checkpoint folder to create.
      tokenizer_dir: the tokenizer folder to bundle; default the run config's ``data.tokenizer``.
      force: replace an existing ``out_dir``.
      config: the run config (or its file) the run was trained with; its ``model`` says the
        architecture.
      overrides: ``key=value`` overrides the run was started with (``--set``).
      step: the training step to export; default the newest committed one.
      dtype: the parameter and compute dtype of the exported model (``float32`` or
        ``bfloat16``: half the size on disk).

    Returns:
      The absolute checkpoint path.

    Raises:
      KestrelError: no checkpoint in ``workdir``, no tokenizer, a tokenizer larger than the
        model's vocabulary, or ``out_dir`` exists without ``force``.
    """
    from model.chat_template import KESTREL_TEMPLATE
    from model.tokenizer import Tokenizer
    from train.data import SYNTHETIC_SOURCE

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = load_config(config) if not isinstance(config, RunConfig) else config
    cfg = apply_overrides(cfg, list(overrides))
    tokenizer_dir = tokenizer_dir or cfg.data.tokenizer
    if not tokenizer_dir:
        raise KestrelError("no tokenizer to bundle: pass tokenizer_dir or set data.tokenizer")
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise KestrelError(f"tokenizer {str(tokenizer_dir)!r} has {tokenizer.vocab_size} ids but "
                           f"model.vocab_size is {cfg.model.vocab_size}")
    if cfg.data.source == SYNTHETIC_SOURCE and tokenizer.chat_template is not None:
        # The synthetic source rendered every example as Kestrel's template does today
        # (train/synthetic/render.py), whatever template the tokenizer folder was saved with
        # (an older checkpoint's, without the effort hint): the model is served with that one.
        tokenizer = tokenizer.with_chat_template(KESTREL_TEMPLATE)
    step = latest_step(workdir) if step is None else int(step)
    # Training keeps float32 master weights; restore exactly those, unsharded, on this host.
    trained = cfg.model.replace(dtype="float32", param_dtype="float32")
    target = abstract_params(trained)
    path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "params"
    if not path.is_dir():
        raise KestrelError(f"{path} does not exist: step {step} is not a checkpoint of {workdir}")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path, target)
    model_cfg = cfg.model.replace(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
    model = model_from_params(model_cfg, params)
    source = {"kind": "kestrel-train", "run": cfg.name, "step": step,
              "workdir": str(pathlib.Path(workdir).absolute())}
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, source=source, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the training workdir")
    parser.add_argument("out", help="the Kestrel checkpoint folder to write")
    parser.add_argument("--config", required=True, help="the configs/NAME.py the run used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override the run was started with")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default data.tokenizer)")
    parser.add_argument("--step", type=int, default=None, help="step to export (default newest)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    out = export_trained(args.workdir, args.out, args.tokenizer, args.force, config=args.config,
                         overrides=args.overrides, step=args.step, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
