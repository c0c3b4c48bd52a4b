"""Token shift (``ModelConfig.token_shift``): the previous token is derived within packed segments
and given explicitly with a cache; cached decoding equals the full forward; it changes the model
(the mix is really used); it is refused on export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding_checks import greedy, greedy_matching_forward
from kestrel.errors import KestrelError
from model import ModelConfig, init_model
from model.convert.hf_config import hf_config_from_model
from model.kv_cache import KVCache
from model.token_shift import NO_PREVIOUS, previous_tokens

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, qk_norm=True, max_position_embeddings=64,
                  token_shift=True)


def sharp_model(cfg=CFG, seed=0):
    """Random weights scaled up so greedy continuations depend on every input."""
    model = init_model(cfg, seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params))
    return model


def test_previous_tokens_restart_at_rows_segments_and_position_zero():
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    assert previous_tokens(tokens).tolist() == [[NO_PREVIOUS, 5, 6, 7, 8]]
    seg = jnp.array([[1, 1, 2, 2, 2]])
    assert previous_tokens(tokens, segment_ids=seg).tolist() == [[NO_PREVIOUS, 5, NO_PREVIOUS, 7, 8]]
    pos = jnp.array([[0, 1, 0, 1, 2]])
    assert previous_tokens(tokens, positions=pos).tolist() == [[NO_PREVIOUS, 5, NO_PREVIOUS, 7, 8]]


def test_packed_segments_equal_separate_rows():
    model = sharp_model()
    a, b = [3, 9, 4, 12, 7], [8, 8, 2, 30]
    packed = jnp.array([a + b])
    seg = jnp.array([[1] * len(a) + [2] * len(b)])
    pos = jnp.array([list(range(len(a))) + list(range(len(b)))])
    forward = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw)[0])  # one compile, not eager per op
    logits = forward(model, packed, segment_ids=seg, positions=pos)
    alone_b = forward(model, jnp.array([b]))
    np.testing.assert_allclose(logits[0, len(a):], alone_b[0], atol=1e-4)


def test_cached_decoding_equals_the_full_forward_and_the_shift_matters():
    model = sharp_model()
    outputs = greedy_matching_forward(model)
    # Without the previous token the same weights continue otherwise.
    nnx.update(model.token_shift, jax.tree.map(jnp.zeros_like, nnx.state(model.token_shift, nnx.Param)))
    assert greedy(model) != outputs


def test_a_cache_needs_prev_tokens():
    model = sharp_model()
    cache = KVCache.create(CFG, 1, 16)
    with pytest.raises(ValueError, match="prev_tokens"):
        model(jnp.array([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="must match tokens"):
        model(jnp.array([[1, 2]]), prev_tokens=jnp.array([[1]]))


def test_export_is_refused():
    with pytest.raises(KestrelError, match="token_shift"):
        hf_config_from_model(CFG.replace(qk_norm=False))
