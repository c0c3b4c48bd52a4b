"""The tiny twin of kestrel_nano: same shape of config, seconds on a CPU (tests, smoke runs).

It reads the deterministic toy source (no tokenizer needed); ``--set
data.source=train.data:synthetic_batches --set data.tokenizer=DIR`` trains it on synthetic data.
"""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig


def config() -> RunConfig:
    return RunConfig(
        name="kestrel_nano_tiny",
        model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, intermediate_size=64, qk_norm=True,
                          max_position_embeddings=256, tie_embeddings=False),
        steps=8,
        compute_dtype="float32",
        strategy="fsdp",
        z_loss=1e-4,
        log_every=1,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1),
        data=DataConfig(source="toy", batch_size=8, seq_len=16),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )
