"""The tiny twin of ``configs/nano.py``: the same pipeline (synthetic data, trained tokenizer,
export) at a size that trains a few steps in seconds on a CPU, for tests and smoke runs.

``data.tokenizer`` must name a tokenizer folder (``--set data.tokenizer=DIR``); its vocabulary
must fit ``VOCAB_SIZE``.
"""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig

VOCAB_SIZE = 8768


def config() -> RunConfig:
    return RunConfig(
        name="nano_tiny",
        model=ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, intermediate_size=64, qk_norm=True,
                          rope_theta=10_000.0, max_position_embeddings=2048,
                          tie_embeddings=True),
        steps=3,
        seed=0,
        compute_dtype="float32",
        strategy="dp",
        z_loss=1e-4,
        log_every=1,
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=1, end_lr_ratio=0.05),
        data=DataConfig(source="train.data:synthetic_batches", batch_size=2, seq_len=1024,
                        tokenizer=None),
        checkpoint=CheckpointConfig(every_steps=3, keep=1, async_save=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
