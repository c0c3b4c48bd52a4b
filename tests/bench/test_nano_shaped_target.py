"""The draft-model benchmark's synthetic target: a small model widened into a larger shape computes
exactly the small model's logits, and its perturbing layers move them."""

import jax.numpy as jnp
import numpy as np
import pytest

from bench.nano_shaped_target import nano_shaped_target
from model.config import ModelConfig
from model.transformer import init_model

SMALL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             intermediate_size=64, max_position_embeddings=256, qk_norm=True)
WIDE = dict(hidden_size=48, num_layers=4, num_heads=6, num_kv_heads=3, head_dim=8, intermediate_size=96)


def logits(model, tokens):
    out = model(tokens)
    return np.asarray(out[0] if isinstance(out, tuple) else out)


@pytest.mark.slow  # eager forward passes of four models: minutes on the shared CPU
def test_widened_model_keeps_the_small_models_logits_until_perturbed():
    small = init_model(ModelConfig(**SMALL), seed=1)
    tokens = jnp.asarray([[5, 17, 3, 88, 41, 2, 60, 9]])
    exact = nano_shaped_target(small, 0.0, shape=WIDE)
    assert exact.config.hidden_size == 48 and exact.config.num_layers == 4
    assert exact.config.vocab_size == 97
    np.testing.assert_allclose(logits(exact, tokens), logits(small, tokens), atol=1e-4)
    moved = nano_shaped_target(small, 50.0, shape=WIDE)
    assert np.abs(logits(moved, tokens) - logits(small, tokens)).max() > 1e-2


def test_a_shape_smaller_than_the_draft_is_refused():
    small = init_model(ModelConfig(**SMALL), seed=1)
    with pytest.raises(ValueError, match="at least nano's size in \\['hidden_size'\\]"):
        nano_shaped_target(small, 0.0, shape={**WIDE, "hidden_size": 16})
