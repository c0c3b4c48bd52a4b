"""The tiny twin of ``configs/smollm2_shape.py``: the same run (toy packed data, bfloat16, dp) at
a size that runs a few steps in seconds on a CPU, for smoke runs of ``bench/train_throughput.py``."""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig


def config() -> RunConfig:
    return RunConfig(
        name="smollm2_shape_tiny",
        model=ModelConfig(vocab_size=1024, hidden_size=64, num_layers=3, num_heads=3,
                          num_kv_heads=1, head_dim=16, intermediate_size=128, norm_eps=1e-5,
                          rope_theta=100_000.0, max_position_embeddings=512, tie_embeddings=True),
        steps=4,
        compute_dtype="bfloat16",
        strategy="dp",
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=2),
        data=DataConfig(source="toy", batch_size=2, seq_len=128),
        checkpoint=CheckpointConfig(every_steps=0),
    )
