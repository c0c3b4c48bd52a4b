"""kestrel-nano as bundled in ``checkpoints/kestrel-nano``: trained from scratch on one 2-core CPU.

Sized for ~30 minutes on a shared 2-core CPU (170-370 tokens/s measured there): a 4-layer,
128-wide GQA transformer (~2M parameters, tied embeddings) over the 7,783-piece sentencepiece
tokenizer that ``train/nano_tokenizer.py`` trains on the generator's own text (embedding rounded
up to 7,808, a multiple of 64). The synthetic answers are mostly copying (numbers into tool
calls, tool results into the answer), which needs heads and RoPE more than width, hence 4 query
heads and no sliding layers. float32 compute (bfloat16 on XLA:CPU was not measured here).
Learning rate 3e-3 after a short warmup; the data follow ``Curriculum.default`` (easy to hard).
150 steps x 4 x 1024 tokens (~0.6M tokens) is far too little to learn the tasks: the model
learns the chat and reasoning format, not the arithmetic copying (see bench/results/nano_*.json).

    python -m train.nano_tokenizer runs/nano/tokenizer --vocab-size 8192 --examples 20000
    kestrel train --config configs/nano.py --workdir runs/nano
    python -m train.export runs/nano checkpoints/kestrel-nano --config configs/nano.py --force
"""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig

# The trained tokenizer saturates at ~5.5K pieces; the embedding rounds that up to a multiple of 64.
VOCAB_SIZE = 7808


def config() -> RunConfig:
    return RunConfig(
        name="nano",
        model=ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=32, intermediate_size=512, qk_norm=True,
                          rope_theta=10_000.0, max_position_embeddings=2048,
                          tie_embeddings=True),
        steps=150,
        seed=0,
        compute_dtype="float32",
        strategy="dp",
        z_loss=1e-4,
        log_every=5,
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10, end_lr_ratio=0.05,
                                  weight_decay=0.05, b2=0.98),
        data=DataConfig(source="train.data:synthetic_batches", batch_size=4, seq_len=1024,
                        tokenizer="runs/nano/tokenizer"),
        checkpoint=CheckpointConfig(every_steps=25, keep=2, async_save=False),
    )
