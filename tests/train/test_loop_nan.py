"""A NaN loss stops training, keeps the last good checkpoint and saves nothing after it."""

import dataclasses

import numpy as np
import pytest

from configs import kestrel_nano_tiny
from kestrel.errors import KestrelError
from sharding.mesh import MeshConfig
from train.checkpointing import TrainCheckpointer
from train.config import CheckpointConfig
from train.loop import run


def one_layer(cfg):
    """The tiny twin with one block: it compiles in half the time on a CPU."""
    return dataclasses.replace(cfg, model=cfg.model.replace(num_layers=1, layer_types=None))
from train.toy_data import ToyBatches


class PoisonedBatches(ToyBatches):
    """Toy batches whose loss mask turns NaN from ``bad_from`` on (corrupt data)."""

    def __init__(self, cfg, bad_from):
        super().__init__(cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed)
        self.bad_from = bad_from

    def batch(self, index):
        batch = super().batch(index)
        if index >= self.bad_from:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    cfg = dataclasses.replace(
        one_layer(kestrel_nano_tiny.config()), steps=6, mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=3, keep=3),
        compiler_options={"xla_backend_optimization_level": 0})
    with pytest.raises(KestrelError, match=r"loss is nan at step 5: training stopped; the last "
                                           r"good checkpoint is step 3"):
        run(cfg, tmp_path, batches=PoisonedBatches(cfg, bad_from=4))
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [3]
    ckpt.close()
