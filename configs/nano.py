"""kestrel-nano as bundled in ``checkpoints/kestrel-nano``: trained from scratch on one 2-core CPU.

Sized for about 40 minutes on a quiet 2-core CPU. Measured there (forward + backward of a packed
4 x 1024 batch): attention dominates the step, and its cost grows with the number of heads, not
with their width, so the model has few wide heads: 4 layers, width 256, 4 query heads of 64 (2 KV
heads), ~5.9M parameters with tied embeddings, 1,513 tokens/s (median of the bundled run) with
the ``xla`` attention (the reference attention on XLA:CPU is ~1.8x slower). The ``grouped``
attention (kv-head-major plain jnp) now trains it 1.15-1.17x faster than ``xla`` (1,838-1,876 vs
1,594-1,599 tokens/s, 8 steps each, 2026-11-30; same losses): the bundled weights were trained
with ``xla``, which computes the same function. The tokenizer is the 8,741-piece sentencepiece
model ``train/nano_tokenizer.py`` trains on the generator's own text, numbers cut into
three-digit chunks (embedding rounded up to 8,768, a multiple of 64). The synthetic answers are
mostly copying (numbers into tool calls, tool results into the answer): with single-digit tokens
the model of this size had learnt nothing of it after 300 steps (its loss on digits was still
log 10, chance), because a lone digit occurs everywhere in the context; three-digit chunks are
distinctive enough for plain induction heads to copy. Copy drills (``train/synthetic/drills.py``,
weight 2 against 1 for every other task) train that copying on its own. Copying needs sharp
attention; with RMS-normed queries and keys the logits of a 64-wide head are bounded by
sqrt(64) x scale, +-8 at the usual 1/sqrt(64), which held attention soft for hundreds of steps
(the model still failed the drills at step 200), so the softmax scale is 0.25 (+-16), as
QK-normed small models elsewhere raise it. Even so, four runs within the CPU budget never learnt
to copy numbers: a two-layer induction circuit forms only after a long plateau. With
``token_shift`` (``model/token_shift.py``) each input also carries the previous token in a
subspace of its own, so a single head can copy; on the toy copy task that cut the plateau from
more than 600 steps to ~250. The data follow
``Curriculum.default`` (easy to hard); 90% of STEM problems offer tools.

    python -m train.nano_tokenizer runs/nano/tokenizer --vocab-size 10240 --examples 20000
    kestrel train --config configs/nano.py --workdir runs/nano
    python -m train.export runs/nano checkpoints/kestrel-nano --config configs/nano.py --force
"""

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig
from train.synthetic import TEXT_TASKS

# The trained tokenizer saturates at 8,741 pieces; the embedding rounds that up to a multiple of 64.
VOCAB_SIZE = 8768


def config() -> RunConfig:
    return RunConfig(
        name="nano",
        model=ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=64, intermediate_size=1024, qk_norm=True,
                          query_scale=0.25, rope_theta=10_000.0, max_position_embeddings=2048,
                          tie_embeddings=True, token_shift=True),
        steps=760,
        seed=0,
        compute_dtype="float32",
        strategy="dp",
        attention="grouped",
        z_loss=1e-4,
        log_every=10,
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=40, end_lr_ratio=0.05,
                                  weight_decay=0.05, b2=0.98),
        data=DataConfig(source="train.data:synthetic_batches", batch_size=4, seq_len=1024,
                        tokenizer="runs/nano/tokenizer", tools_fraction=0.9,
                        tasks=tuple((name, 2.0 if name == "copy" else 1.0) for name in TEXT_TASKS)),
        checkpoint=CheckpointConfig(every_steps=100, keep=2, async_save=True),
    )
