"""The training loop and ``kestrel train``: sharded init, jitted step, checkpoints, progress.

``kestrel train --config configs/NAME.py [--workdir DIR] [--set key=value ...] [--resume]`` calls
:func:`main`; library users call :func:`run`. Every check of user input (config keys, mesh,
batch divisibility, teacher) happens before anything is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kestrel.errors import KestrelError
from model.checkpoint import abstract_params as param_shapes
from model.transformer import init_model
from sharding import distributed
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding, optimizer_shardings, param_shardings, strategy_rules
from train import metrics as metrics_lib
from train.checkpointing import TrainCheckpointer, host_rng
from train.config import RunConfig, apply_overrides, load_config
from train.image_batch import default_max_images, image_inputs
from train.loss import training_loss
from train.optimizer import check_frozen, check_kind, make_optimizer
from train.teacher import check_teacher, initial_params, load_teacher
from train.toy_data import ToyBatches

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# For tests of kill-and-resume: SIGKILL this process right after the checkpoint of this step.
KILL_ENV = "KESTREL_TRAIN_KILL_AFTER_CHECKPOINT"


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves: per-step losses of this process's run, and the final state."""

    losses: dict[int, float]
    last_step: int
    start_step: int
    params: Any
    opt_state: Any
    workdir: pathlib.Path


def make_batches(cfg: RunConfig) -> Iterator[dict]:
    """The data iterator the config names (``toy`` or a ``module:function`` factory)."""
    if cfg.data.source == "toy":
        return ToyBatches(cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed)
    module_name, _, fn_name = cfg.data.source.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise KestrelError(f"data.source {cfg.data.source!r} cannot be imported: {e}") from e
    return factory(cfg)


def shard_batch(batch: dict, sharding: NamedSharding, batch_size: int, seq_len: int, *,
                vision=None, max_images: int = 0) -> dict:
    """Places a global numpy batch on the mesh; every process holds the same global batch.

    A batch that carries ``images`` needs the model's ``vision`` config: its images become the
    fixed-shape ``pixels`` and ``image_count`` (``train/image_batch.py``), replicated, and its
    ``image_span_ids`` are placed as the other [B, T] arrays.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a batch needs {list(BATCH_KEYS)}")
    arrays = {key: np.asarray(batch[key]) for key in BATCH_KEYS}
    extra = {}
    if "images" in batch:
        if vision is None:
            raise ValueError("the batch carries images but the model has no vision tower")
        extra = image_inputs(batch, vision, max_images)
        arrays["image_span_ids"] = extra.pop("image_span_ids")
    out = {}
    for key, arr in arrays.items():
        if arr.shape != (batch_size, seq_len):
            raise ValueError(f"batch[{key!r}] has shape {arr.shape}, expected "
                             f"[B, T]={(batch_size, seq_len)}")
        arr = arr.astype(np.float32 if key == "loss_mask" else np.int32)
        out[key] = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
    # Images are not aligned with the batch's rows: every device holds all of them.
    replicated = NamedSharding(sharding.mesh, P())
    for key, arr in extra.items():
        out[key] = jax.make_array_from_callback(arr.shape, replicated, lambda idx, a=arr: a[idx])
    return out


def gather_rows(x: jax.Array, at: jax.Array) -> jax.Array:
    """``x[b, at[b, k]]``: [B, T, ...] at positions [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)


def loss_positions(batch: dict, keep: int) -> tuple[jax.Array, dict]:
    """The first ``keep`` loss-mask positions of each row [B, keep] (padded with position 0),
    and the targets and loss mask there (0 on the padding), for a loss over those positions only.
    Rows are gathered on their own, so a batch sharded by rows stays so."""
    mask = batch["loss_mask"] > 0
    at = jax.vmap(lambda m: jnp.nonzero(m, size=keep, fill_value=0)[0])(mask)
    real = jnp.arange(keep)[None, :] < jnp.sum(mask, axis=1, keepdims=True)
    loss_mask = gather_rows(batch["loss_mask"], at) * real
    return at, {"targets": gather_rows(batch["targets"], at), "loss_mask": loss_mask}


def fits_logit_positions(batch: dict, keep: int | None) -> bool:
    """Whether every row's loss tokens fit the positions whose logits the step computes."""
    return keep is None or int(np.max(np.sum(np.asarray(batch["loss_mask"]) > 0, axis=1))) <= keep


def make_train_step(graphdef, tx, cfg: RunConfig, teacher_graphdef=None):
    """The un-jitted step.

    ``(params, opt_state, rng, batch, teacher_params, step_index) -> (params, opt_state, rng,
    metrics)``; ``step_index`` counts from 0 and only feeds the learning rate reported.
    """

    keep = cfg.logit_positions  # None: logits at every position

    def forward(gd, params, batch, exits=False, at=None):
        """Logits [B, T, V] (with ``at`` [B, K]: at those positions of each row, [B, K, V])
        and, with ``exits``, the exit heads' logits likewise."""
        model = nnx.merge(gd, params)
        images = {}
        if "pixels" in batch:
            # The tower runs inside the step (its gradients flow); the zero images padding the
            # batch to a fixed count give no soft tokens, and no span names them.
            soft = model.encode_images(batch["pixels"], cfg.attention)  # [I, M, D]
            real = jnp.arange(soft.shape[0]) < batch["image_count"]
            images = dict(image_embeddings=jnp.where(real[:, None, None], soft, 0),
                          span_ids=batch["image_span_ids"])
        # With ``at`` the model projects (and points) only at those positions.
        out = model(
            batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
            attn_impl=cfg.attention, return_exits=exits, logits_index=at, **images)
        if not exits:
            return out[0]  # [B, T or K, V] float32
        return out[0], (out[2] if at is None else tuple(gather_rows(e, at) for e in out[2]))

    train_exits = bool(cfg.early_exit_weight and cfg.model.exit_layers)

    schedule = make_optimizer(cfg.optimizer, cfg.steps)[1]

    def step(params, opt_state, rng, batch, teacher_params, step_index):
        at, targets = None, batch
        if keep is not None:
            at, targets = loss_positions(batch, keep)
        teacher_logits = None
        if teacher_graphdef is not None:
            teacher_logits = jax.lax.stop_gradient(forward(teacher_graphdef, teacher_params, batch, at=at))

        def loss_fn(p):
            logits, exit_logits = (forward(graphdef, p, batch, exits=True, at=at) if train_exits
                                   else (forward(graphdef, p, batch, at=at), ()))
            return training_loss(
                logits, targets, z_loss=cfg.z_loss,
                teacher_logits=teacher_logits, distill_weight=cfg.distill.weight,
                temperature=cfg.distill.temperature, exit_logits=exit_logits,
                exit_weight=cfg.early_exit_weight)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # The model has no stochastic layers yet; the key still advances so that resumed runs
        # hand future ones (dropout, sampling-based losses) the same randomness.
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step_index),
               **parts}
        return params, opt_state, rng, out

    return step


def check_config(cfg: RunConfig, num_devices: int):
    """User-input checks that need no compilation; returns the resolved mesh sizes.

    Raises:
      KestrelError: a mesh that does not fit the devices, a batch the data axes cannot split,
        an unusable teacher or ``init_from`` checkpoint, or ``optimizer.frozen`` naming no
        parameter (or every one).
    """
    try:
        sizes = cfg.mesh.resolve(num_devices)
    except ValueError as e:
        raise KestrelError(str(e)) from e
    data_shards = sizes[0] * sizes[1]
    if cfg.data.batch_size % data_shards:
        raise KestrelError(
            f"data.batch_size {cfg.data.batch_size} is not divisible by the data axes "
            f"(data={sizes[0]} x fsdp={sizes[1]} = {data_shards})")
    if cfg.distill.teacher is not None:
        check_teacher(cfg.distill.teacher, cfg.model)
    if cfg.init_from is not None:
        check_teacher(cfg.init_from, cfg.model, role="init_from")
    check_kind(cfg.optimizer.kind)
    if cfg.optimizer.frozen:
        check_frozen(tuple(cfg.optimizer.frozen), param_shapes(cfg.model))
    return sizes


def run(config: RunConfig | str | pathlib.Path, workdir: str | pathlib.Path | None = None,
        overrides: list[str] | tuple[str, ...] = (), resume: bool = False, *,
        batches: Iterator[dict] | None = None, devices: list | None = None,
        report=None) -> RunResult:
    """Trains a model as the config says.

    Args:
      config: a RunConfig or the path of a config file.
      workdir: where checkpoints and ``metrics.jsonl`` go (default ``runs/<name>``).
      overrides: ``key=value`` strings applied to the config.
      resume: continue from the newest readable checkpoint in ``workdir``.
      batches: an iterator of global batches replacing the configured source (tests).
      devices: the devices of the mesh (default: all global devices).
      report: a callable for one-line messages (default: stderr on process 0).

    Raises:
      KestrelError: for bad user input (before compiling), or a non-finite loss (after keeping
        the last good checkpoint).
    """
    cfg = load_config(config) if not isinstance(config, RunConfig) else config
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.distill.teacher is not None:
        check_teacher(cfg.distill.teacher, cfg.model)
    if cfg.init_from is not None:
        check_teacher(cfg.init_from, cfg.model, role="init_from")
    distributed.initialize(cfg.distributed)
    devices = list(jax.devices() if devices is None else devices)
    check_config(cfg, len(devices))
    workdir = pathlib.Path(workdir if workdir is not None else pathlib.Path("runs") / cfg.name).absolute()
    is_main = jax.process_index() == 0
    if report is None:
        def report(text):
            if is_main:
                print(text, file=sys.stderr, flush=True)

    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save)
    existing = ckpt.steps()
    if existing and not resume:
        ckpt.close()
        raise KestrelError(f"{workdir} already holds checkpoints (steps {existing}); pass "
                           "--resume to continue, or choose another --workdir")

    mesh = make_mesh(cfg.mesh, devices)
    rules = strategy_rules(cfg.strategy)
    student = cfg.student
    abstract_model = nnx.eval_shape(lambda: init_model(student, cfg.seed))
    graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    p_shard = param_shardings(abstract_state, rules, mesh)
    tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   nnx.to_pure_dict(abstract_state), p_shard)
    o_shard = optimizer_shardings(jax.eval_shape(tx.init, abstract_params), p_shard, mesh)
    replicated = NamedSharding(mesh, P())
    b_shard = batch_sharding(mesh, rules)
    vision = student.vision
    max_images = 0
    if vision is not None:
        max_images = cfg.data.max_images or default_max_images(
            cfg.data.batch_size, cfg.data.seq_len, vision.mm_tokens_per_image)

    teacher_graphdef = teacher_params = t_shard = None
    if cfg.distill.teacher is not None:
        teacher_graphdef, teacher_params = load_teacher(
            cfg.distill.teacher, cfg.model, rules, mesh, cfg.compute_dtype)
        t_shard = jax.tree.map(lambda a: a.sharding, teacher_params)

    with jax.set_mesh(mesh):
        init_params, init_opt, step_fns = _jitted(
            cfg, mesh, graphdef, tx, p_shard, o_shard, b_shard, t_shard, teacher_graphdef)

        data = batches if batches is not None else make_batches(cfg)
        start_step, data_state = 0, None
        restored = None
        if resume:
            try:
                restored = ckpt.restore_latest(
                    params=abstract_params, opt_state=abstract_like_shardings(o_shard, tx, abstract_params),
                    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated), report=report)
            except RuntimeError as e:
                ckpt.close()
                raise KestrelError(str(e)) from e
            if restored is None:
                report(f"--resume: no checkpoint in {workdir / 'checkpoints'}; starting from step 0")
        if restored is not None:
            params, opt_state, rng = restored.params, restored.opt_state, restored.rng
            start_step, data_state = restored.step, restored.data_state
            if data_state is not None:
                if not hasattr(data, "set_state"):
                    ckpt.close()
                    raise KestrelError("the checkpoint holds a data iterator state but the data "
                                       "source has no set_state(); it cannot resume exactly")
                data.set_state(data_state)
            report(f"resumed from step {start_step} ({workdir / 'checkpoints'})")
        else:
            params, opt_state = init_params(), None
            if cfg.init_from is not None:
                params = initial_params(cfg.init_from, params, student, rules, mesh, cfg.compute_dtype,
                                        report)
            opt_state = init_opt(params)
            rng = jax.device_put(host_rng(cfg.seed), replicated)

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
        if teacher_graphdef is not None:  # the teacher's forward pass is a third of its training
            tcfg = check_teacher(cfg.distill.teacher, cfg.model)
            flops += metrics_lib.flops_per_token(tcfg, cfg.data.seq_len) / 3 * tokens_per_step
        peak = cfg.peak_flops_per_device or metrics_lib.peak_flops(jax.devices()[0].device_kind)
        progress = metrics_lib.ProgressLogger(
            total_steps=cfg.steps, start_step=start_step, tokens_per_step=tokens_per_step,
            flops_per_step=flops, peak_flops_total=peak * len(devices) if peak else None,
            jsonl_path=workdir / "metrics.jsonl", enabled=is_main)
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        losses: dict[int, float] = {}
        told_every_logit = False
        step = start_step
        try:
            for step in range(start_step + 1, cfg.steps + 1):
                try:
                    raw = next(data)
                except StopIteration:
                    report(f"the data source ran out after step {step - 1}")
                    step -= 1
                    break
                every_logit = not fits_logit_positions(raw, cfg.logit_positions)
                if every_logit and not told_every_logit:
                    told_every_logit = True
                    report(f"step {step}: a row holds more loss tokens than the {cfg.logit_positions} "
                           "positions whose logits the step computes (logits_share x seq_len); such "
                           "steps compute every position's logits (the same loss, one more compilation)")
                try:
                    batch = shard_batch(raw, b_shard, cfg.data.batch_size, cfg.data.seq_len,
                                        vision=vision, max_images=max_images)
                except ValueError as e:
                    raise KestrelError(f"step {step}: {e}") from e
                if "pixels" in batch and teacher_graphdef is not None:
                    raise KestrelError(f"step {step}: distillation of batches with images is not "
                                       "supported (the teacher is a text model)")
                # Text batches keep the text step; image batches (fixed shapes) compile one more.
                fn = step_fns["pixels" in batch, every_logit]
                started = time.perf_counter()
                params, opt_state, rng, out = fn(params, opt_state, rng, batch, teacher_params,
                                                 np.int32(step - 1))
                out = jax.device_get(out)
                if step == start_step + 1:  # compile time is most of a large model's first step
                    report(f"step {step} (compilation included) took {time.perf_counter() - started:.1f} s")
                loss = float(out["loss"])
                # A finite loss with a non-finite gradient would leave NaN parameters behind.
                if not math.isfinite(loss) or not math.isfinite(float(out["grad_norm"])):
                    ckpt.wait()
                    kept = ckpt.steps()
                    what = f"loss is {loss}" if not math.isfinite(loss) else \
                        f"gradient norm is {float(out['grad_norm'])}"
                    raise KestrelError(
                        f"{what} at step {step}: training stopped; the last good "
                        f"checkpoint is " + (f"step {kept[-1]} in {ckpt.directory}" if kept
                                             else "none (no checkpoint was saved yet)"))
                losses[step] = loss
                if step % cfg.log_every == 0 or step == cfg.steps:
                    progress.log(step, out)
                every = cfg.checkpoint.every_steps
                if every and (step % every == 0 or step == cfg.steps):
                    ckpt.save(step, params=params, opt_state=opt_state, rng=rng,
                              data_state=data.get_state() if hasattr(data, "get_state") else None)
                    if kill_after == step:
                        ckpt.wait()
                        os.kill(os.getpid(), signal.SIGKILL)
        finally:
            progress.close()
            ckpt.close()
    return RunResult(losses, step, start_step, params, opt_state, workdir)


_JIT_CACHE: dict = {}


def _jitted(cfg, mesh, graphdef, tx, p_shard, o_shard, b_shard, t_shard, teacher_graphdef):
    """Jitted init and step functions, reused by later runs of the same config and mesh.

    Reuse lets a process that trains again (a resumed run, a benchmark, a notebook) skip
    recompiling: jit caches executables per function object.
    """
    key = (repr((cfg.student, cfg.optimizer, cfg.steps, cfg.seed, cfg.z_loss, cfg.early_exit_weight, cfg.distill.weight,
                 cfg.distill.temperature, cfg.strategy, cfg.attention, cfg.logits_share,
                 cfg.compiler_options)), mesh,
           repr(teacher_graphdef))
    if key in _JIT_CACHE:
        return _JIT_CACHE[key]
    student = cfg.student
    replicated = NamedSharding(mesh, P())
    init_params = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(init_model(student, cfg.seed), nnx.Param)),
        out_shardings=p_shard, compiler_options=cfg.compiler_options)
    init_opt = jax.jit(tx.init, out_shardings=o_shard, compiler_options=cfg.compiler_options)
    cut = make_train_step(graphdef, tx, cfg, teacher_graphdef)
    # A batch whose rows hold more loss tokens than logits_share allows takes the step that
    # computes every position's logits.
    full = cut if cfg.logit_positions is None else make_train_step(
        graphdef, tx, dataclasses.replace(cfg, logits_share=1.0), teacher_graphdef)

    def jit_step(step, batch_shardings):
        return jax.jit(
            step, in_shardings=(p_shard, o_shard, replicated, batch_shardings, t_shard, replicated),
            out_shardings=(p_shard, o_shard, replicated, replicated),
            donate_argnums=(0, 1), compiler_options=cfg.compiler_options)

    # Batches with images: the [B, T] arrays plus image_span_ids as before, pixels and count
    # replicated (shard_batch places them so). jit traces each only when such a batch arrives.
    image_shardings = {**{k: b_shard for k in BATCH_KEYS}, "image_span_ids": b_shard,
                       "pixels": replicated, "image_count": replicated}
    steps = {}
    for images in (False, True):
        shardings = image_shardings if images else b_shard
        steps[images, False] = jit_step(cut, shardings)
        steps[images, True] = steps[images, False] if full is cut else jit_step(full, shardings)
    if len(_JIT_CACHE) >= 8:
        _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
    _JIT_CACHE[key] = (init_params, init_opt, steps)
    return _JIT_CACHE[key]


def abstract_like_shardings(o_shard, tx, abstract_params):
    """Abstract optimizer state with the given shardings (a restore target)."""
    abstract = jax.eval_shape(tx.init, abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, o_shard)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kestrel train", description="Train or distill a model.")
    parser.add_argument("--config", required=True, help="a configs/NAME.py file")
    parser.add_argument("--workdir", default=None, help="checkpoints and metrics (default runs/NAME)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. mesh.fsdp=4")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--coordinator", default=None,
                        help="multi-host: HOST:PORT of process 0 (otherwise auto-detected)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """``kestrel train``: returns 0 on success; raises KestrelError on bad input."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    given = [a is not None for a in (args.coordinator, args.num_processes, args.process_id)]
    if any(given) and not all(given):
        raise KestrelError("--coordinator, --num-processes and --process-id go together")
    if all(given):
        # The mode goes last: the distributed config checks it against the other three fields.
        overrides += [f"distributed.coordinator_address={args.coordinator}",
                      f"distributed.num_processes={args.num_processes}",
                      f"distributed.process_id={args.process_id}",
                      "distributed.mode=explicit"]
    result = run(args.config, args.workdir, overrides, args.resume)
    if jax.process_index() == 0:
        last = result.losses.get(result.last_step)
        print(f"done: step {result.last_step}" + (f", loss {last:.4f}" if last is not None else "")
              + f"; workdir {result.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
