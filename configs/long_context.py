"""A 200K-token model: kestrel-nano's width with Gemma 3's local/global pattern and YaRN scaling.

Five sliding-window layers (window 1,024, RoPE base 10,000 unscaled, as Gemma 3's local layers)
to one global layer (base 1,000,000 with YaRN, factor 32 over an 8,192-token pre-training context,
so 262,144 positions), repeated twice. Only the two global layers keep every token's K/V; the
sliding ones keep their window plus one prefill chunk, so the KV cache of a 200K-token sequence is
about a sixth of an all-global model's:

    kestrel plan configs/long_context.py --context 200000 --batch 4

The recipe trains at 8,192 tokens (YaRN's original context) and serves at up to 262,144; this
repository ships the configuration, not trained weights (a 2-core CPU cannot train it).
"""

from model.config import ModelConfig, RopeScaling
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig
from train.synthetic import TASKS

VOCAB_SIZE = 8768
PATTERN = ("sliding",) * 5 + ("global",)


def model() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=256, num_layers=12, num_heads=4,
                       num_kv_heads=2, head_dim=64, intermediate_size=1024, qk_norm=True,
                       query_scale=0.25, rope_theta=1_000_000.0,
                       rope_scaling=RopeScaling(type="yarn", factor=32.0,
                                                original_max_position_embeddings=8192),
                       rope_local_theta=10_000.0, layer_types=PATTERN * 2, sliding_window=1024,
                       max_position_embeddings=262_144, tie_embeddings=True)


def config() -> RunConfig:
    return RunConfig(
        name="long_context",
        model=model(),
        steps=2000,
        seed=0,
        compute_dtype="bfloat16",
        strategy="fsdp",
        z_loss=1e-4,
        log_every=10,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100, end_lr_ratio=0.05,
                                  weight_decay=0.05, b2=0.98),
        data=DataConfig(source="train.data:synthetic_batches", batch_size=8, seq_len=8192,
                        tokenizer="runs/nano/tokenizer", tools_fraction=0.9,
                        tasks=tuple((name, 1.0) for name in TASKS)),
        checkpoint=CheckpointConfig(every_steps=200, keep=2, async_save=True),
    )
