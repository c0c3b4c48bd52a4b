"""The optimizer: global-norm clipping, then AdamW (or Muon for the hidden matrices) under linear
warmup and cosine decay; parameters under ``OptimizerConfig.frozen`` are left out of all of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


OPTIMIZERS = ("adamw", "muon")

# How Muon sees each hidden projection as a matrix: (reduction axes, output axes). The attention
# projections keep their heads as separate axes ([D, H, hd] in, [H, hd, D] out); Muon
# orthogonalises the flattened [D, H * hd] / [H * hd, D] matrix, as for a fused projection.
_MUON_AXES = {"q_proj": (0, (1, 2)), "k_proj": (0, (1, 2)), "v_proj": (0, (1, 2)), "o_proj": ((0, 1), 2)}
# Only these parts of the tree hold the language model's hidden matrices; embeddings and the
# output head stay with AdamW, as Muon's authors advise, and so does the vision tower (untried).
_MUON_PARTS = ("blocks/", "token_shift/")


def muon_axes(path: str, ndim: int) -> tuple | None:
    """(reduction, output) axes for Muon of the parameter at `path` with `ndim` dimensions, or
    None where AdamW updates it (vectors, embeddings, head, anything outside the hidden layers)."""
    if not path.startswith(_MUON_PARTS) or ndim < 2:
        return None
    name = path.rsplit("/", 1)[-1]
    if ndim == 3 and name in _MUON_AXES:
        return _MUON_AXES[name]
    return (0, 1) if ndim == 2 else None


def muon_dimension_numbers(params):
    """``optax.contrib.MuonDimensionNumbers`` per Muon-updated parameter, None elsewhere.

    Muon's own transforms call this on trees with the other side's leaves masked out; those
    placeholders (no ``ndim``) are handed back as they came."""
    from optax.contrib import MuonDimensionNumbers

    out = {}
    for path, p in flatten_params(params).items():
        if not hasattr(p, "ndim"):
            out[path] = p
            continue
        axes = muon_axes(path, p.ndim)
        out[path] = None if axes is None else MuonDimensionNumbers(*axes)
    return nest_params(out, params)


def adam_matrices(params):
    """True on the matrices that Muon leaves to its AdamW side (embeddings, output head, the vision
    tower's): the ones ``decay_mask`` decays under ``adamw`` that Muon's own decay does not reach."""
    flat = flatten_params(params)
    return nest_params({k: p.ndim >= 2 and muon_axes(k, p.ndim) is None for k, p in flat.items()}, params)


def decoupled_weight_decay(schedule: optax.Schedule, weight_decay: float, mask) -> optax.GradientTransformation:
    """Adds ``-schedule(step) * weight_decay * p`` to the updates of the parameters `mask` picks:
    AdamW's decoupled decay, applied after an update that is already scaled."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        rate = schedule(state.count) * weight_decay
        updates = jax.tree.map(lambda u, p, m: u - rate * p if m else u, updates, params, mask(params))
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def check_kind(kind: str) -> None:
    """Raises KestrelError for an ``optimizer.kind`` that is not one of `OPTIMIZERS`."""
    if kind not in OPTIMIZERS:
        raise KestrelError(f"optimizer.kind must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


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
    check_kind(cfg.kind)
    if cfg.kind == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:  # muon
        from optax.contrib import muon

        # consistent_rms=0.2 scales each orthogonalised update to AdamW's typical RMS (Moonlight's
        # recipe), so one learning rate and weight decay serve both kinds of parameter. Muon keeps
        # its own momentum (0.95); its AdamW side takes b1 and b2. The alias's one Nesterov switch
        # is off so that side is the plain AdamW that ``adamw`` runs.
        parts.append(muon(schedule, eps=cfg.eps, weight_decay=cfg.weight_decay, consistent_rms=0.2,
                          muon_weight_dimension_numbers=muon_dimension_numbers,
                          adam_b1=cfg.b1, adam_b2=cfg.b2, nesterov=False))
        # The alias decays every AdamW-side parameter or none; decay its matrices (the
        # embeddings) as ``adamw`` does, and leave its norms and biases alone.
        parts.append(decoupled_weight_decay(schedule, cfg.weight_decay, adam_matrices))
    if cfg.frozen:
        # Zeroed before the clip (their gradients take no share of its norm) and after AdamW
        # (no decay). Their Adam moments exist but stay zero: one state layout for every run,
        # which the optimizer-state sharding rules read.
        frozen = tuple(cfg.frozen)
        zero = optax.masked(optax.set_to_zero(), lambda params: frozen_mask(params, frozen))
        parts = [zero, *parts, zero]
    return optax.chain(*parts), schedule
