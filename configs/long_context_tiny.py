"""The tiny twin of ``configs/long_context.py``: the same 5:1 sliding/global pattern, YaRN and
262,144 positions at a width that prefills 200K tokens on a CPU (tests and
``bench/long_context.py`` build it with random weights)."""

from model.config import ModelConfig, RopeScaling
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig


def model() -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=64, num_layers=6, num_heads=1, num_kv_heads=1,
                       head_dim=32, intermediate_size=128, rope_theta=1_000_000.0,
                       rope_scaling=RopeScaling(type="yarn", factor=32.0,
                                                original_max_position_embeddings=8192),
                       rope_local_theta=10_000.0, layer_types=("sliding",) * 5 + ("global",),
                       sliding_window=256, max_position_embeddings=262_144, tie_embeddings=True)


def config() -> RunConfig:
    return RunConfig(
        name="long_context_tiny",
        model=model(),
        steps=4,
        compute_dtype="float32",
        strategy="fsdp",
        log_every=1,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
        data=DataConfig(source="toy", batch_size=4, seq_len=64),
        checkpoint=CheckpointConfig(every_steps=4, keep=1),
    )
