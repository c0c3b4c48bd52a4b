"""The pointer (``ModelConfig.pointer_dim``, ``model/pointer.py``): a normalised mixture whose
copy part puts each query's attention over the earlier positions of its own segment on the
tokens that followed them, never a later one; the gathered-rows and cached paths equal the full forward; a closed
gate is the plain model; config, export and early exit are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding_checks import greedy, greedy_matching_forward
from kestrel.errors import KestrelError
from model import ModelConfig, init_model
from model.convert.hf_config import hf_config_from_model

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, qk_norm=True, max_position_embeddings=64,
                  token_shift=True, pointer_dim=16)
TOKENS = jnp.array([[3, 9, 4, 3, 12, 9, 3, 7, 4, 4], [5, 5, 6, 1, 2, 3, 4, 5, 6, 7]])


def sharp_model(cfg=CFG, seed=0, gate_bias=None):
    """Weights x8 so that outputs depend on the context; the gate bias set when given."""
    model = init_model(cfg, seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params))
    if gate_bias is not None:
        model.pointer.gate_bias[...] = jnp.float32(gate_bias)
    return model


def forward(model, tokens, **kwargs):
    return model(tokens, **kwargs)[0]


def test_output_is_a_normalised_distribution():
    out = forward(sharp_model(gate_bias=0.0), TOKENS)
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, atol=1e-5)


def test_an_open_gate_copies_the_tokens_that_followed_the_attended_positions_of_the_segment():
    """With zero queries the pointer attends uniformly, and with the gate open the output is each
    token's share of the tokens after the earlier positions of the query's segment (a segment's
    first token has none: it is the plain model's)."""
    model = sharp_model(gate_bias=40.0)
    model.pointer.query[...] = jnp.zeros_like(model.pointer.query[...])
    segments = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
    out = np.asarray(jnp.exp(forward(model, TOKENS, segment_ids=segments,
                                     positions=jnp.array([list(range(4)) + list(range(6)), list(range(10))]))))
    tokens, segs = np.asarray(TOKENS), np.asarray(segments)
    plain = np.asarray(jnp.exp(jax.nn.log_softmax(model.logits(model(TOKENS, segment_ids=segments, return_hidden=True,
                                                                       positions=jnp.array([list(range(4)) + list(range(6)), list(range(10))]))[2]))))
    for b in range(2):
        for t in range(10):
            followers = [tokens[b, j + 1] for j in range(t) if segs[b, j] == segs[b, t]]
            if not followers:
                np.testing.assert_allclose(out[b, t], plain[b, t], atol=1e-5)
                continue
            expected = np.bincount(followers, minlength=CFG.vocab_size) / len(followers)
            np.testing.assert_allclose(out[b, t], expected, atol=1e-5)


def test_a_closed_gate_is_the_plain_model():
    model = sharp_model(gate_bias=-60.0)
    plain = init_model(CFG.replace(pointer_dim=0), 0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del params["pointer"]
    nnx.update(plain, nnx.State(params))
    np.testing.assert_allclose(forward(model, TOKENS), jax.nn.log_softmax(forward(plain, TOKENS)), atol=1e-4)


def test_no_position_sees_a_later_token():
    model = sharp_model(gate_bias=0.0)
    changed = TOKENS.at[:, 6].set(50)
    np.testing.assert_allclose(forward(model, TOKENS)[:, :6], forward(model, changed)[:, :6], atol=1e-6)
    assert not np.allclose(forward(model, TOKENS)[:, 6:], forward(model, changed)[:, 6:], atol=1e-3)


def test_logits_at_given_rows_equal_the_full_forward():
    model = sharp_model(gate_bias=0.0)
    full = forward(model, TOKENS)
    at = jnp.array([[2, 5, 9], [0, 1, 7]])
    np.testing.assert_allclose(forward(model, TOKENS, logits_index=at),
                               jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-5)
    last = jnp.array([9, 4])
    np.testing.assert_allclose(forward(model, TOKENS, logits_index=last)[:, 0], full[jnp.arange(2), last],
                               atol=1e-5)


def test_cached_decoding_equals_the_full_forward_and_the_pointer_matters():
    model = sharp_model(gate_bias=0.0)
    prompts = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 8], [30, 31, 32, 33, 30, 31])
    outputs = greedy_matching_forward(model, prompts)
    model.pointer.gate_bias[...] = jnp.float32(-60.0)
    assert greedy(model, prompts) != outputs


def test_config_round_trips_counts_its_parameters_and_bad_widths_are_refused():
    assert ModelConfig.from_json(CFG.to_json()) == CFG
    assert CFG.num_params == sum(x.size for x in jax.tree.leaves(nnx.state(init_model(CFG, 0), nnx.Param)))
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="pointer_dim"):
            CFG.replace(pointer_dim=bad)
    with pytest.raises(ValueError, match="pointer_dim needs a global layer"):
        CFG.replace(layer_types=("sliding", "sliding"), sliding_window=4)


def test_export_and_early_exit_are_refused():
    with pytest.raises(KestrelError, match="pointer"):
        hf_config_from_model(CFG.replace(qk_norm=False, token_shift=False))
    from model.paged_cache import PagedKVCache

    model = init_model(CFG.replace(exit_layers=(1,)), 0)
    k, v = PagedKVCache.create_pages(model.config, (4,), 4, (0, 0))
    cache = PagedKVCache(k=k, v=v, page_tables=(jnp.zeros((1, 1), jnp.int32),),
                         slots=(jnp.zeros((1, 1), jnp.int32),), positions=jnp.zeros((1, 1), jnp.int32),
                         lengths=jnp.ones((1,), jnp.int32), layer_groups=(0, 0))
    with pytest.raises(ValueError, match="pointer"):
        model(jnp.zeros((1, 1), jnp.int32), cache=cache, exit_threshold=jnp.float32(0.5),
              prev_tokens=jnp.zeros((1, 1), jnp.int32))


def test_the_token_after_each_slot_is_found_by_position():
    """A dense cache's slots: a right-padded prompt, then decoded tokens (``next_tokens``)."""
    from model.pointer import next_tokens

    ids = jnp.array([[5, 6, 7, 9, 8, 4]])
    positions = jnp.array([[0, 1, 2, -1, 3, 4]])
    got = np.asarray(next_tokens(ids, positions))[0]
    assert [got[i] for i in (0, 1, 2, 4, 5)] == [6, 7, 8, 4, -1]


def test_the_mixture_and_its_gradients_equal_the_vocabulary_wide_formula():
    """``mix`` corrects only the context's ids (repeated ones, and one outside the vocabulary,
    included); the result and its gradients equal logaddexp over the whole vocabulary."""
    from model.pointer import allowed_positions, copy_distribution

    pointer = sharp_model(gate_bias=0.3).pointer
    logits = jax.random.normal(jax.random.key(1), (2, 5, CFG.vocab_size)) * 3
    hidden = jax.random.normal(jax.random.key(2), (2, 5, CFG.hidden_size))
    keys = jax.random.normal(jax.random.key(3), (2, 7, CFG.pointer_dim))
    ids = jnp.array([[3, 3, 5, 3, 60, -1, 5], [1, 2, 1, 1, 1, 9, 9]])
    allowed = allowed_positions(jnp.array([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]), jnp.broadcast_to(jnp.arange(7), (2, 7)))

    def whole_vocabulary(logits, keys):
        ok = allowed & (ids >= 0)[:, None, :]
        scores = jnp.einsum("btp,bsp->bts", hidden @ pointer.query[...], keys) * CFG.pointer_dim ** -0.5
        weights = jnp.where(ok, jax.nn.softmax(jnp.where(ok, scores, -1e30), -1), 0)
        copy = copy_distribution(weights, ids, CFG.vocab_size)
        z = (hidden @ pointer.gate[...] + pointer.gate_bias[...])[..., None]
        some = ok.any(-1)[..., None]  # a query with nothing to copy from (position 0) only generates
        return jnp.logaddexp(jnp.where(some, jax.nn.log_sigmoid(-z), 0) + jax.nn.log_softmax(logits, -1),
                             jnp.where(some, jax.nn.log_sigmoid(z), -jnp.inf)
                             + jnp.where(copy > 0, jnp.log(jnp.maximum(copy, 1e-30)), -jnp.inf))

    def mixed(logits, keys):
        return pointer.mix(logits, hidden, keys, ids, allowed)

    np.testing.assert_allclose(mixed(logits, keys), whole_vocabulary(logits, keys), atol=1e-5)
    weights = jax.random.normal(jax.random.key(5), logits.shape)
    grads = [jax.grad(lambda a, b: jnp.sum(f(a, b) * weights), argnums=(0, 1))(logits, keys)
             for f in (mixed, whole_vocabulary)]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, atol=1e-4)
