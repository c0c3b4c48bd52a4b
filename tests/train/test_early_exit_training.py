"""Training exit heads: the exit logits are the truncated model's, and a short run with
``early_exit_weight`` lowers the exit head's cross entropy (logged as ``exit_ce_0``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.rope import rope_tables
from model.transformer import init_model, rope_frequencies
from sharding.mesh import MeshConfig
from train import loop
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig
from train.loss import training_loss
from train.metrics import read_jsonl

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16,
                    intermediate_size=64, max_position_embeddings=256, exit_layers=(1,))


def test_exit_logits_are_the_final_head_on_the_exit_layers_state():
    graphdef, state = nnx.split(init_model(MODEL, seed=1))
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % 64

    @jax.jit  # one compilation instead of one per eager op
    def run(state):
        model = nnx.merge(graphdef, state)
        logits, _, exits = model(tokens, return_exits=True)
        rope = rope_tables(jnp.arange(12)[None], *rope_frequencies(MODEL)["global"])
        x, _ = model.blocks[0](model.embed(tokens), rope=rope, q_positions=None, kv_positions=None)
        return logits, exits, model.logits(model.final_norm(x))

    logits, exits, by_hand = run(state)
    assert len(exits) == 1 and exits[0].shape == logits.shape
    np.testing.assert_allclose(exits[0], by_hand, rtol=1e-5, atol=1e-5)
    assert not np.allclose(exits[0], logits, atol=1e-3)
    # The loss adds each exit's masked cross entropy with the weight.
    batch = {"targets": np.roll(tokens, -1, axis=1), "loss_mask": np.ones((1, 12), np.float32)}
    plain, parts0 = training_loss(logits, batch)
    loss, parts = training_loss(logits, batch, exit_logits=exits, exit_weight=0.5)
    assert float(loss) == pytest.approx(float(plain) + 0.5 * float(parts["exit_ce_0"]), rel=1e-6)


def test_training_with_early_exit_weight_lowers_the_exit_heads_loss(tmp_path):
    cfg = RunConfig(model=MODEL, name="exit", steps=40, compute_dtype="float32", strategy="dp",
                    early_exit_weight=1.0, log_every=1, mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
                    optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2, end_lr_ratio=0.1),
                    data=DataConfig(source="toy", batch_size=4, seq_len=64),
                    checkpoint=CheckpointConfig(every_steps=1000, keep=1, async_save=False),
                    compiler_options={"xla_backend_optimization_level": 0})
    loop.run(cfg, tmp_path, devices=jax.devices()[:1], report=lambda *_: None)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    exit_ce = [r["exit_ce_0"] for r in records if "exit_ce_0" in r]
    assert len(exit_ce) == 40
    assert np.mean(exit_ce[-5:]) < 0.7 * np.mean(exit_ce[:3])
    # A weight without exit layers is refused before anything compiles.
    with pytest.raises(ValueError, match="exit_layers"):
        RunConfig(model=MODEL.replace(exit_layers=()), early_exit_weight=1.0)
