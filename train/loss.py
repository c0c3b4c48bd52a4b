"""Training losses: next-token cross entropy over a loss mask, z-loss, and distillation KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def masked_mean(values: Float[Array, "B T"], mask: Float[Array, "B T"]) -> Float[Array, ""]:
    """Mean of ``values`` over the tokens where ``mask`` is set (0 when no token is)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
                  ) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token cross entropy and log-partition ``log Z``, both in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def distill_kl(student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"],
               temperature: float) -> Float[Array, "B T"]:
    """Per-token KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al.)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1) * temperature ** 2


def training_loss(logits, batch, *, z_loss: float = 0.0, teacher_logits=None,
                  distill_weight: float = 0.0, temperature: float = 1.0,
                  exit_logits=(), exit_weight: float = 0.0):
    """The scalar loss and its parts, averaged over ``batch["loss_mask"]``.

    Args:
      logits: student logits [B, T, V].
      batch: dict with ``targets`` [B, T] and ``loss_mask`` [B, T].
      z_loss: weight of ``mean(log Z ^ 2)``.
      teacher_logits: teacher logits [B, T, V] or None.
      distill_weight: w in ``(1 - w) * ce + w * kl`` (only with teacher logits).
      temperature: the KL temperature.
      exit_logits: the early-exit heads' logits, one [B, T, V] per exit layer.
      exit_weight: each exit head's cross entropy (same targets and mask) is added with this
        weight (LayerSkip's early-exit loss, a constant weight per exit).

    Returns:
      (loss, dict of float32 scalars ``ce``, ``z_loss``, ``kl``, ``exit_ce_<i>``).
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    ce_tok, log_z = cross_entropy(logits, batch["targets"])
    ce = masked_mean(ce_tok, mask)
    parts = {"ce": ce}
    loss = ce
    if teacher_logits is not None:
        kl = masked_mean(distill_kl(logits, teacher_logits, temperature), mask)
        loss = (1.0 - distill_weight) * ce + distill_weight * kl
        parts["kl"] = kl
    if z_loss:
        zl = masked_mean(log_z ** 2, mask)
        loss = loss + z_loss * zl
        parts["z_loss"] = zl
    for i, exit_lg in enumerate(exit_logits):
        exit_ce = masked_mean(cross_entropy(exit_lg, batch["targets"])[0], mask)
        loss = loss + exit_weight * exit_ce
        parts[f"exit_ce_{i}"] = exit_ce
    return loss, parts
