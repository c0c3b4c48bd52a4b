"""The optimizer: global-norm clipping, then AdamW under linear warmup and cosine decay."""

from __future__ import annotations

import jax
import optax

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


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation and its learning-rate schedule."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
