"""Training checkpoints with orbax: asynchronous, atomic, keep-N, with fallback past bad ones.

A checkpoint holds the parameters, the optimizer state, the RNG key data, and (as JSON) the step
and the data iterator's state. Orbax writes each step into a temporary folder and renames it on
commit, so a killed run never leaves a half-written step behind; a step whose files were later
truncated or corrupted fails to restore, and :meth:`TrainCheckpointer.restore_latest` then says so
and takes the previous one.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
    """What a checkpoint gave back."""

    step: int
    params: Any
    opt_state: Any
    rng: Any
    data_state: Any


def _encode_state(state: Any) -> Any:
    # grain's DataLoader state is bytes; JSON needs text.
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode()}
    return state


def _decode_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class TrainCheckpointer:
    """Saves and restores training state under ``directory`` (one sub-folder per step)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def steps(self) -> list[int]:
        """Committed steps, oldest first (uncommitted temporary folders are not listed)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, *, params: Any, opt_state: Any, rng: jax.Array,
             data_state: Any = None) -> None:
        """Starts saving ``step``; returns once device arrays are copied, before the write ends."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.StandardSave({"key": rng}),
            meta=ocp.args.JsonSave({"step": step, "data_state": _encode_state(data_state)}),
        ), force=True)

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self.manager.wait_until_finished()

    def restore(self, step: int, *, params: Any, opt_state: Any, rng: Any) -> Restored:
        """Restores ``step`` onto the shapes, dtypes and shardings of the abstract targets given.

        The targets may carry shardings of a different mesh than the one saved from.
        """
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            opt_state=ocp.args.StandardRestore(opt_state),
            rng=ocp.args.StandardRestore({"key": rng}),
            meta=ocp.args.JsonRestore(),
        ))
        leaves = jax.tree.leaves((out.params, out.opt_state))
        for leaf in leaves:  # a zero-filled hole or bit flip in float data often shows as NaN
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and \
                    not bool(jax.numpy.isfinite(leaf).all()):
                raise ValueError("restored values are not finite")
        meta = out.meta
        if int(meta["step"]) != step:
            raise ValueError(f"metadata names step {meta['step']}")
        return Restored(step, out.params, out.opt_state, out.rng["key"],
                        _decode_state(meta.get("data_state")))

    def restore_latest(self, *, params: Any, opt_state: Any, rng: Any,
                       report: Callable[[str], None] = print) -> Restored | None:
        """Restores the newest readable step, reporting each unreadable one it skips.

        Returns:
          The restored state, or None when there is no committed checkpoint.

        Raises:
          RuntimeError: checkpoints exist but none of them can be read.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.restore(step, params=params, opt_state=opt_state, rng=rng)
            except Exception as e:  # any failure to read means this step is unusable
                older = [s for s in steps if s < step]
                nxt = f"falling back to step {older[-1]}" if older else "no older checkpoint"
                report(f"checkpoint at step {step} in {self.directory} is unreadable "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                       f"{nxt}")
                continue
            for bad in (s for s in steps if s > step):
                # The resumed run saves these steps again; the unreadable copies must go first.
                self.manager.delete(bad)
                report(f"removed unreadable checkpoint step {bad}")
            return restored
        if steps:
            raise RuntimeError(f"no readable checkpoint in {self.directory} (steps {steps})")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def host_rng(seed: int) -> np.ndarray:
    """The RNG key data a run starts from."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
