"""The tiny twin of ``configs/smollm2_shape.py``: the same run (toy packed data, bfloat16, dp) at
a size that runs a few steps in seconds on a CPU, for smoke runs of ``bench/train_throughput.py``."""

import dataclasses

from configs import smollm2_shape
from model.config import ModelConfig
from train.config import RunConfig


def config() -> RunConfig:
    full = smollm2_shape.config()
    return dataclasses.replace(
        full, name="smollm2_shape_tiny", steps=4,
        model=ModelConfig(vocab_size=1024, hidden_size=64, num_layers=3, num_heads=3,
                          num_kv_heads=1, head_dim=16, intermediate_size=128, norm_eps=1e-5,
                          rope_theta=100_000.0, max_position_embeddings=512, tie_embeddings=True),
        data=dataclasses.replace(full.data, batch_size=2, seq_len=128))
