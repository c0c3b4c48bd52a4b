"""The loop's parts: learning-rate schedule, optimizer, loss, toy data, progress and MFU."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from train.config import OptimizerConfig
from train.loss import cross_entropy, training_loss
from train.metrics import ProgressLogger, flops_per_token, format_duration, peak_flops, read_jsonl
from train.optimizer import learning_rate_schedule, make_optimizer
from train.toy_data import ToyBatches


def test_schedule_warms_up_then_cosine_decays():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(0.1)
    values = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_clipping_and_weight_decay_mask():
    # With eps = 1 Adam's first update is -lr * g / (|g| + 1), so it shows the clipped gradient:
    # four entries of 100 clipped to global norm 1 become 0.5 each: update -0.5 / 1.5.
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    grads = {"w": jnp.full((2, 2), 100.0), "scale": jnp.zeros((2,))}
    for clip, expected in ((1.0, -1 / 3), (None, -100 / 101)):
        cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, clip_norm=clip, weight_decay=0.0,
                              end_lr_ratio=1.0, eps=1.0)
        tx, _ = make_optimizer(cfg, total_steps=10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
    # Zero gradient: only weight decay moves parameters, and only matrices.
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.5, end_lr_ratio=1.0)
    tx, _ = make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], np.zeros(2))


def test_cross_entropy_and_masking():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # [1, 2, 3]
    targets = jnp.array([[0, 1]])
    ce, log_z = cross_entropy(logits, targets)
    np.testing.assert_allclose(ce, [[-np.log(0.5), -np.log(0.8)]], rtol=1e-6)
    np.testing.assert_allclose(log_z, 0.0, atol=1e-6)
    loss, parts = training_loss(logits, {"targets": targets, "loss_mask": jnp.array([[0.0, 1.0]])},
                                z_loss=0.1)
    assert float(parts["ce"]) == pytest.approx(-np.log(0.8), rel=1e-6)
    assert float(loss) == pytest.approx(-np.log(0.8), rel=1e-5)  # log Z = 0: no z-loss
    shifted = logits + 2.0  # log Z = 2 for every token
    loss, parts = training_loss(shifted, {"targets": targets, "loss_mask": jnp.ones((1, 2))},
                                z_loss=0.1)
    assert float(parts["z_loss"]) == pytest.approx(4.0, rel=1e-5)


def test_toy_batches_are_packed_deterministic_and_resumable():
    src = ToyBatches(vocab_size=50, batch_size=4, seq_len=32, seed=3)
    first = [next(src) for _ in range(3)]
    b = first[0]
    assert {k: v.shape for k, v in b.items()} == {k: (4, 32) for k in b}
    assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    # Targets are the next token within a document; the mask is 0 where a document ends.
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    np.testing.assert_array_equal(b["targets"][:, :-1][same], b["tokens"][:, 1:][same])
    assert set(np.unique(b["segment_ids"])) == {1, 2}
    starts = np.diff(b["segment_ids"], axis=1) != 0
    assert (b["positions"][:, 1:][starts] == 0).all()
    state = src.get_state()
    later = next(src)
    other = ToyBatches(vocab_size=50, batch_size=4, seq_len=32, seed=3)
    other.set_state(state)
    jax.tree.map(np.testing.assert_array_equal, next(other), later)
    assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])


def test_progress_bar_and_jsonl(tmp_path):
    stream = io.StringIO()
    cfg = ModelConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, intermediate_size=32)
    flops = flops_per_token(cfg, 64) * 128
    log = ProgressLogger(total_steps=4, start_step=0, tokens_per_step=128, flops_per_step=flops,
                         peak_flops_total=1e9, jsonl_path=tmp_path / "m.jsonl", stream=stream)
    for step in (1, 2, 3):
        log.log(step, {"loss": 2.0 / step, "lr": 0.1})
    log.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 1/4") and "loss 2.0000" in lines[0] and "ETA ?" in lines[0]
    assert "tok/s" in lines[2] and "MFU" in lines[2] and "ETA 0m" in lines[2]
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["tokens_per_s"] > 0 and records[2]["mfu"] > 0 and records[2]["eta_s"] >= 0
    assert records[2]["mfu"] == pytest.approx(records[2]["tokens_per_s"] / 128 * flops / 1e9)
    json.dumps(records)
    assert flops_per_token(cfg, 64) == 6 * cfg.num_params + 12 * 2 * 64 * 2 * 8
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None
    assert format_duration(3725) == "1h02m05s"
