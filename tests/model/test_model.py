"""Properties of the model family on tiny random configs: causality, windows, packing, caching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import KVCache, ModelConfig, init_model

# One compiled program per call shape instead of hundreds of eager dispatches.
forward = nnx.jit(lambda model, x, **kw: model(x, **kw))

BASE = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=64, max_position_embeddings=256)
CONFIGS = {
    "llama": ModelConfig(**BASE),
    "gemma": ModelConfig(**BASE, activation="gelu_tanh", norm_plus_one=True, qk_norm=True,
                         post_norms=True, embed_scale=True, layer_types=("sliding", "sliding", "global"),
                         sliding_window=5, rope_local_theta=10_000.0, rope_theta=1e6,
                         query_scale=0.25, final_logit_softcap=30.0, attn_logit_softcap=50.0),
    "qwen2": ModelConfig(**BASE, attention_bias=True, tie_embeddings=False),
}


def tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, BASE["vocab_size"])


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_future_tokens_do_not_change_past_logits(name):
    model = init_model(CONFIGS[name], seed=1)
    x = tokens(1, 12)
    y = x.at[0, 8:].set((x[0, 8:] + 1) % BASE["vocab_size"])
    lx, _ = forward(model, x)
    ly, _ = forward(model, y)
    np.testing.assert_allclose(lx[0, :8], ly[0, :8], atol=1e-6)
    assert not np.allclose(lx[0, 8:], ly[0, 8:], atol=1e-4)


def test_sliding_window_limits_what_a_layer_sees():
    cfg = ModelConfig(**{**BASE, "num_layers": 1}, layer_types=("sliding",), sliding_window=4)
    model = init_model(cfg, seed=2)
    x = tokens(1, 12)
    y = x.at[0, 0:3].set((x[0, 0:3] + 5) % BASE["vocab_size"])
    lx, _ = forward(model, x)
    ly, _ = forward(model, y)
    # One sliding layer: position p sees p-3..p, so positions >= 6 cannot see tokens 0..2.
    np.testing.assert_allclose(lx[0, 6:], ly[0, 6:], atol=1e-6)
    assert not np.allclose(lx[0, 3], ly[0, 3], atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_full_forward(name):
    cfg = CONFIGS[name]
    model = init_model(cfg, seed=3)
    x = tokens(2, 14, seed=4)
    full, _ = forward(model, x)
    cache = KVCache.create(cfg, 2, 32)
    _, cache = forward(model, x[:, :6], cache=cache)  # a prefill chunk, then one token at a time
    outs = []
    for i in range(6, 14):
        logits, cache = forward(model, x[:, i:i + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full[:, 6:], atol=2e-5)
    assert int(cache.lengths[0]) == 14


def test_packed_segments_do_not_attend_across_documents():
    cfg = CONFIGS["llama"]
    model = init_model(cfg, seed=5)
    a, b = tokens(1, 7, seed=6), tokens(1, 5, seed=7)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 5])
    positions = jnp.array([list(range(7)) + list(range(5))])
    lp, _ = forward(model, packed, segment_ids=segments, positions=positions)
    la, _ = forward(model, a)
    lb, _ = forward(model, b)
    np.testing.assert_allclose(lp[:, :7], la, atol=2e-5)
    np.testing.assert_allclose(lp[:, 7:], lb, atol=2e-5)


def test_packed_documents_in_query_chunks_equal_each_alone(monkeypatch):
    """With the grouped attention a packed batch is cut into query chunks that skip the keys after
    them (model/kernels/grouped.py); each document's logits still equal its own forward pass."""
    import model.kernels.grouped as grouped

    monkeypatch.setattr(grouped, "QUERY_CHUNK", 8)
    model = init_model(CONFIGS["gemma"], seed=5)
    docs = [tokens(1, n, seed=20 + n) for n in (11, 9, 6)]
    packed = jnp.concatenate(docs + [jnp.zeros((1, 6), jnp.int32)], axis=1)  # 6 padding tokens last
    segments = jnp.array([[1] * 11 + [2] * 9 + [3] * 6 + [0] * 6])
    positions = jnp.array([list(range(11)) + list(range(9)) + list(range(6)) + list(range(26, 32))])
    grouped_forward = nnx.jit(lambda model, x, **kw: model(x, attn_impl="grouped", **kw))
    lp, _ = grouped_forward(model, packed, segment_ids=segments, positions=positions)
    start = 0
    for doc in docs:
        alone, _ = forward(model, doc)  # attn_impl auto: the reference on CPU
        np.testing.assert_allclose(lp[:, start:start + doc.shape[1]], alone, atol=2e-5)
        start += doc.shape[1]


def test_batched_with_padding_equals_one_at_a_time():
    cfg = CONFIGS["gemma"]
    model = init_model(cfg, seed=8)
    a, b = tokens(1, 9, seed=9), tokens(1, 5, seed=10)
    batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 4)))], axis=0)
    positions = jnp.array([list(range(9)), list(range(5)) + [-1] * 4])
    lbatch, _ = forward(model, batch, positions=positions)
    la, _ = forward(model, a)
    lb, _ = forward(model, b)
    np.testing.assert_allclose(lbatch[0], la[0], atol=2e-5)
    np.testing.assert_allclose(lbatch[1, :5], lb[0], atol=2e-5)


def test_bidirectional_span_sees_later_span_tokens_only():
    cfg = CONFIGS["llama"]
    model = init_model(cfg, seed=11)
    x = tokens(1, 10, seed=12)
    spans = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    y = x.at[0, 5].set((x[0, 5] + 3) % BASE["vocab_size"])
    lx, _ = forward(model, x, span_ids=spans)
    ly, _ = forward(model, y, span_ids=spans)
    np.testing.assert_allclose(lx[0, :2], ly[0, :2], atol=1e-6)  # before the span: causal
    assert not np.allclose(lx[0, 2], ly[0, 2], atol=1e-4)  # span start sees the span's end


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(**{**BASE, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(**BASE, layer_types=("sliding", "global", "global"))
    with pytest.raises(ValueError, match="layer_types has 2"):
        ModelConfig(**BASE, layer_types=("global", "global"))
    cfg = CONFIGS["gemma"]
    assert ModelConfig.from_json(cfg.to_json()) == cfg
