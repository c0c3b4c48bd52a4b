"""kestrel-nano pre-training: ~53M parameters, FSDP over all devices, bfloat16 compute."""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig


def config() -> RunConfig:
    return RunConfig(
        name="kestrel_nano",
        model=ModelConfig(vocab_size=32768, hidden_size=512, num_layers=12, num_heads=8,
                          num_kv_heads=2, head_dim=64, intermediate_size=1536, qk_norm=True,
                          rope_theta=1e6, max_position_embeddings=4096, tie_embeddings=True),
        steps=20_000,
        compute_dtype="bfloat16",
        strategy="fsdp",
        z_loss=1e-4,
        log_every=10,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=500, weight_decay=0.1),
        # Synthetic STEM + tool-use data; the tokenizer folder comes from data.tokenizer or
        # $KESTREL_DATA_TOKENIZER.
        data=DataConfig(source="train.data:synthetic_batches", batch_size=64, seq_len=1024),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
    )
