"""The model gives the same logits through the Pallas kernels (interpret mode) as the reference."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import KVCache, ModelConfig, init_model

forward = nnx.jit(lambda model, x, **kw: model(x, **kw), static_argnames=("attn_impl",))

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=64, qk_norm=True,
                  layer_types=("sliding", "global"), sliding_window=5, attn_logit_softcap=30.0,
                  max_position_embeddings=128)


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_full_forward_with_packed_documents():
    model = init_model(CFG, seed=2)
    x = _tokens(2, 21)
    segments = np.ones((2, 21), np.int32)
    segments[:, 9:] = 2  # two packed documents per row
    want, _ = forward(model, x, segment_ids=segments, attn_impl="reference")
    got, _ = forward(model, x, segment_ids=segments, attn_impl="pallas")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_cached_decode():
    """Prefill a chunk, then decode token by token: runtime positions with empty cache slots."""
    model = init_model(CFG, seed=3)
    x = _tokens(2, 10, seed=1)
    logits = {}
    for impl in ("reference", "pallas"):
        cache = KVCache.create(CFG, 2, 16)
        steps = []
        out, cache = forward(model, x[:, :6], cache=cache, attn_impl=impl)
        steps.append(out)
        for i in range(6, 8):
            out, cache = forward(model, x[:, i:i + 1], cache=cache, attn_impl=impl)
            steps.append(out)
        logits[impl] = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(logits["pallas"], logits["reference"], atol=1e-4, rtol=1e-4)
