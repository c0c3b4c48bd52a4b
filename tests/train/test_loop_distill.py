"""Distillation: a teacher checkpoint is loaded onto the mesh and its KL term enters the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import kestrel_nano_tiny
from kestrel.errors import KestrelError
from model.transformer import init_model
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DistillConfig
from train.loop import run
from train.loss import distill_kl, training_loss
from train.teacher import save_teacher


def config(teacher, weight):
    base = kestrel_nano_tiny.config()
    return dataclasses.replace(
        base, model=base.model.replace(num_layers=1, layer_types=None), steps=4, mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        strategy="fsdp_tp", z_loss=0.0, checkpoint=CheckpointConfig(every_steps=0),
        distill=DistillConfig(teacher=str(teacher), weight=weight, temperature=2.0),
        compiler_options={"xla_backend_optimization_level": 0})


def test_distill_pulls_the_student_to_the_teacher(tmp_path):
    # With weight 1 the loss is KL(teacher || student) alone. A teacher equal to the student's
    # initialisation gives 0 (step 2 too: warmup makes step 1's learning rate 0).
    cfg = config(tmp_path / "same", weight=1.0)
    save_teacher(init_model(cfg.student, cfg.seed), tmp_path / "same")
    same = run(cfg, tmp_path / "run_same")
    assert abs(same.losses[1]) < 1e-6 and abs(same.losses[2]) < 1e-6
    # A different teacher gives a positive KL that training reduces.
    cfg = config(tmp_path / "other", weight=1.0)
    save_teacher(init_model(cfg.student, seed=1), tmp_path / "other")
    other = run(cfg, tmp_path / "run_other")
    assert other.losses[1] > 1e-3
    assert other.losses[4] < other.losses[1]


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    cfg = config(tmp_path / "teacher", weight=0.5)
    save_teacher(init_model(cfg.student.replace(vocab_size=80), 0), tmp_path / "teacher")
    with pytest.raises(KestrelError, match="vocab_size 80 but the student has 64"):
        run(cfg, tmp_path / "run")


def test_kl_loss_mixes_with_cross_entropy():
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    batch = {"targets": jnp.zeros((2, 5), jnp.int32),
             "loss_mask": jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)}
    ce_only, parts = jax.jit(training_loss)(student, batch)
    mixed, mparts = jax.jit(lambda s, b, t: training_loss(
        s, b, teacher_logits=t, distill_weight=0.25, temperature=2.0))(student, batch, teacher)
    kl = np.asarray(jax.jit(distill_kl, static_argnums=2)(student, teacher, 2.0))
    expected_kl = float(np.sum(kl * np.asarray(batch["loss_mask"])) / 8)
    assert mparts["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert float(mixed) == pytest.approx(0.75 * float(ce_only) + 0.25 * expected_kl, rel=1e-5)
    # KL against a direct computation of sum p_t (log p_t - log p_s) at temperature 2, times 4.
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    log_pt, log_ps = log_softmax(np.asarray(teacher) / 2), log_softmax(np.asarray(student) / 2)
    direct = np.sum(np.exp(log_pt) * (log_pt - log_ps), -1) * 4
    np.testing.assert_allclose(kl, direct, rtol=1e-4, atol=1e-6)


def test_init_from_starts_the_run_from_a_checkpoint(tmp_path):
    # The student starts as the checkpoint (seed 1), so its KL to that same model as teacher is 0
    # at step 1; from its own initialisation (seed 0) it is not (the test above).
    cfg = config(tmp_path / "ckpt", weight=1.0)
    save_teacher(init_model(cfg.student, seed=1), tmp_path / "ckpt")
    tuned = run(dataclasses.replace(cfg, init_from=str(tmp_path / "ckpt")), tmp_path / "run")
    assert abs(tuned.losses[1]) < 1e-6


def test_init_from_another_architecture_is_refused(tmp_path):
    cfg = config(tmp_path / "teacher", weight=0.5)
    save_teacher(init_model(cfg.student, 0), tmp_path / "teacher")
    wide = cfg.student.replace(intermediate_size=2 * cfg.student.intermediate_size)
    save_teacher(init_model(wide, 0), tmp_path / "wide")
    with pytest.raises(KestrelError, match=r"init_from .*wide.*has shape"):
        run(dataclasses.replace(cfg, init_from=str(tmp_path / "wide")), tmp_path / "run")
    with pytest.raises(KestrelError, match="init_from .*missing.* does not exist"):
        run(dataclasses.replace(cfg, init_from=str(tmp_path / "missing")), tmp_path / "run2")
