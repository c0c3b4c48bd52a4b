"""Training throughput at SmolLM2-135M's shape: the MFU benchmark's config (not a model we ship).

30 layers of width 576, 9 query and 3 KV heads of 64, FFN 1536, a tied 49,152-token embedding
(134.5M parameters), packed sequences of 2,048 tokens in bfloat16 compute with float32 master
weights and AdamW, data-parallel over every device. The data are the toy source's packed
documents (cheap to make, so the step, not the host, is measured).

    python bench/train_throughput.py --config configs/smollm2_shape.py --steps 12 \\
        --out bench/results/train_throughput_h200.json
"""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig


def config() -> RunConfig:
    return RunConfig(
        name="smollm2_shape",
        model=ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, intermediate_size=1536, norm_eps=1e-5,
                          rope_theta=100_000.0, max_position_embeddings=8192, tie_embeddings=True),
        steps=20,
        compute_dtype="bfloat16",
        strategy="dp",
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=2),
        data=DataConfig(source="toy", batch_size=32, seq_len=2048),
        checkpoint=CheckpointConfig(every_steps=0),
    )
