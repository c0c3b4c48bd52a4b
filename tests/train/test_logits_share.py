"""``RunConfig.logits_share``: logits only at each row's loss positions give the same losses as
logits everywhere, and a batch with more loss tokens in a row than the share allows takes the
step with every position's logits (the same losses again), said once in the log."""

import dataclasses

import numpy as np
import pytest

from configs import kestrel_nano_tiny
from kestrel.errors import KestrelError
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, apply_overrides
from train.loop import run
from train.toy_data import ToyBatches

FAST = {"xla_backend_optimization_level": 0}


def tiny(**changes):
    cfg = kestrel_nano_tiny.config()
    return dataclasses.replace(
        cfg, model=cfg.model.replace(num_layers=1, layer_types=None), steps=3,
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1), checkpoint=CheckpointConfig(every_steps=0),
        compiler_options=FAST, **changes)


def toy(cfg):
    return ToyBatches(cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed)


def most_loss_tokens_per_row(cfg, steps):
    source = toy(cfg)
    return max(int(np.max(np.sum(next(source)["loss_mask"] > 0, axis=1))) for _ in range(steps))


def test_losses_equal_logits_everywhere(tmp_path):
    full = tiny()
    most = most_loss_tokens_per_row(full, full.steps)
    assert most < full.data.seq_len  # some positions carry no loss, so the share really cuts
    cut = dataclasses.replace(full, logits_share=most / full.data.seq_len)
    assert cut.logit_positions == most
    a = run(full, tmp_path / "full", batches=toy(full)).losses
    b = run(cut, tmp_path / "cut", batches=toy(cut)).losses
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_rows_beyond_the_share_take_the_full_step(tmp_path):
    cfg = tiny()
    most = most_loss_tokens_per_row(cfg, 1)
    small = dataclasses.replace(cfg, logits_share=(most - 1) / cfg.data.seq_len)
    said = []
    a = run(cfg, tmp_path / "full", batches=toy(cfg)).losses
    b = run(small, tmp_path / "small", batches=toy(small), report=said.append).losses
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    told = [line for line in said if "more loss tokens" in line]
    assert len(told) == 1 and told[0].startswith("step 1:")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_share_out_of_range_is_refused(value):
    with pytest.raises(KestrelError, match="logits_share"):
        apply_overrides(tiny(), [f"logits_share={value}"])
