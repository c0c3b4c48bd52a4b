"""Needle retrieval through the engine on the hand-set induction model of ``bench/needle.py``."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.needle import haystack, needle_model, retrieve


def test_hand_set_model_retrieves_a_value_and_nothing_without_a_needle():
    model = needle_model()
    last_logits = nnx.jit(lambda m, tokens: m(tokens)[0][:, -1])  # one compile, not eager per op
    tokens = haystack(300, {20: (45, 60), 150: (41, 53)})
    for key, value in ((45, 60), (41, 53)):
        assert int(np.argmax(last_logits(model, jnp.asarray([tokens + [key]]))[0])) == value
    # A key that was never hidden: no value stands out.
    assert float(np.max(last_logits(model, jnp.asarray([tokens + [44]]))[0])) < 1.0


def test_engine_retrieves_needles_across_chunks_and_pages():
    # 3,000 tokens: 12 prefill chunks, the sliding layer's table starting far past page 0.
    result = retrieve(3_000, depths=(0.0, 0.5, 0.95))
    assert result["found"] == result["asked"] == 3, result
