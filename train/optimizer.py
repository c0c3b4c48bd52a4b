"""The optimizer: global-norm clipping, then AdamW under linear warmup and cosine decay; parameters
under ``OptimizerConfig.frozen`` are left out of all of it."""

from __future__ import annotations

import jax
import optax

from kestrel.errors import KestrelError
from model.checkpoint import flatten_params, nest_params
from train.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``end_lr_ratio * peak``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=warmup + decay, end_value=cfg.learning_rate * cfg.end_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def is_frozen(path: str, frozen: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (``flatten_params``'s ``a/b/0/c``) lies under a `frozen` prefix."""
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in frozen)


def frozen_mask(params, frozen: tuple[str, ...]):
    """True on the parameters under one of the `frozen` path prefixes."""
    return nest_params({path: is_frozen(path, frozen) for path in flatten_params(params)}, params)


def check_frozen(frozen: tuple[str, ...], params) -> None:
    """Raises KestrelError, naming it, for a `frozen` prefix that matches no parameter of `params`."""
    paths = list(flatten_params(params))
    for prefix in frozen:
        if not any(is_frozen(p, (prefix,)) for p in paths):
            tops = sorted({p.split("/")[0] for p in paths})
            raise KestrelError(f"optimizer.frozen: {prefix!r} names no parameter of the model "
                               f"(its top-level parameters: {', '.join(tops)})")
    if all(is_frozen(p, frozen) for p in paths):
        raise KestrelError("optimizer.frozen freezes every parameter: nothing would train")


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation and its learning-rate schedule."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if cfg.frozen:
        # Zeroed before the clip (their gradients take no share of its norm) and after AdamW
        # (no decay). Their Adam moments exist but stay zero: one state layout for every run,
        # which the optimizer-state sharding rules read.
        frozen = tuple(cfg.frozen)
        zero = optax.masked(optax.set_to_zero(), lambda params: frozen_mask(params, frozen))
        parts = [zero, *parts, zero]
    return optax.chain(*parts), schedule
