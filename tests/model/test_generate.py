"""Offline generation and scoring: equal to a step-by-step full forward, deterministic, checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kestrel.errors import KestrelError
from model import ModelConfig, init_model
from model.generate import GenerationConfig, Generator
from model.sampling import FAST_K, filter_logits

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, layer_types=("sliding", "global"),
                  sliding_window=6, qk_norm=True, max_position_embeddings=64)


forward = nnx.jit(lambda model, x: model(x)[0])


@pytest.fixture(scope="module")
def setup():
    model = init_model(CFG, seed=0)
    return model, Generator(model)


def greedy_by_full_forward(model, prompt, n, width=32):
    """Greedy continuation by re-running the whole sequence each step. The sequence is padded on
    the right to one fixed width: causal attention keeps the padding out of the logits at the last
    real position, and one call shape compiles once instead of once per length."""
    seq = list(prompt)
    assert len(seq) + n <= width
    for _ in range(n):
        logits = forward(model, jnp.array([seq + [0] * (width - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_batch_equals_full_forward_per_prompt(setup):
    model, gen = setup
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 8], [30, 31, 32, 33]]
    results = gen.generate(prompts, GenerationConfig(max_new_tokens=9))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_by_full_forward(model, prompt, 9)
        assert len(result.logprobs) == 9 and all(lp <= 0 for lp in result.logprobs)


def test_stop_token_ends_a_row_early(setup):
    _, gen = setup
    free = gen.generate([[3, 4, 5]], GenerationConfig(max_new_tokens=8))[0].token_ids
    stop = free[2]
    stopped = gen.generate([[3, 4, 5]], GenerationConfig(max_new_tokens=8, stop_ids=(stop,)))[0]
    assert stopped.token_ids == free[:free.index(stop) + 1]


def test_sampling_is_seeded(setup):
    _, gen = setup
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a = gen.generate([[1, 2, 3]], cfg)[0].token_ids
    b = gen.generate([[1, 2, 3]], cfg)[0].token_ids
    c = gen.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=12, temperature=1.5, seed=8))[0]
    assert a == b and a != c.token_ids


def test_filters_keep_expected_sets():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    one = jnp.ones((1,))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)[0]))  # noqa: E731
    assert kept(top_k=jnp.array([2]), top_p=one, min_p=0 * one).tolist() == [True, True, False, False]
    assert kept(top_k=jnp.array([0]), top_p=0.7 * one, min_p=0 * one).tolist() == [True, True, False, False]
    assert kept(top_k=jnp.array([0]), top_p=one, min_p=0.2 * one).tolist() == [True, True, True, False]


@pytest.mark.parametrize("peaked", [False, True], ids=["bisection", "best-64"])
def test_filters_match_a_sorted_reference_on_wide_rows(peaked):
    """Top-k, nucleus and min-p cut where a NumPy sort of each row says, over a 49,152-token
    vocabulary, whether the cuts are read off the 64 best tokens (peaked rows, as a language
    model's usually are) or found by bisection (flat rows, top-k 300); switched off, every token
    stays (float32 cumulative sums reach 1 before the end of such a row, which once dropped its
    tail)."""
    rng = np.random.default_rng(3)
    b, v = 6, 49152
    scale = rng.uniform(8, 12, (b, 1)) if peaked else rng.uniform(0.5, 6, (b, 1))
    logits = (rng.standard_normal((b, v)) * scale).astype(np.float32)
    top_k = np.array([0, 40, 0, 0, 64 if peaked else 300, 0])
    top_p = np.array([0.9, 1.0, 0.5, 1.0, 0.95, 1.0], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.05, 0.01, 0.0], np.float32)
    p = np.exp(logits - logits.max(1, keepdims=True))
    best_mass = np.sort(p / p.sum(1, keepdims=True), 1)[:, -FAST_K:].sum(1)
    fits = ((top_k > 0) & (top_k <= FAST_K)) | ((top_p < 1) & (best_mass >= top_p)) | ((top_k <= 0) & (top_p >= 1))
    assert fits.all() == peaked  # which way the cuts are found
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k=jnp.asarray(top_k),
                                               top_p=jnp.asarray(top_p), min_p=jnp.asarray(min_p))))
    for row in range(b):
        p = np.exp(logits[row].astype(np.float64) - logits[row].max())
        p /= p.sum()
        order = np.argsort(-p)
        n = v if top_k[row] <= 0 else top_k[row]
        if top_p[row] < 1:
            n = min(n, int(np.searchsorted(np.cumsum(p[order]), top_p[row])) + 1)
        n = min(n, int((p >= min_p[row] * p.max()).sum()))
        want = np.zeros(v, bool)
        want[order[:max(n, 1)]] = True
        assert (got[row] == want).all(), f"row {row}: kept {got[row].sum()}, want {want.sum()}"
    assert got[5].all()


def test_score_matches_full_forward(setup):
    model, gen = setup
    ids = [5, 9, 2, 44, 17, 3, 8]
    scored = gen.score(ids)
    logprobs = jax.nn.log_softmax(forward(model, jnp.array([ids]))[0], axis=-1)
    expected = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    np.testing.assert_allclose(scored.logprobs, expected, atol=1e-5)
    assert scored.token_ids == [int(x) for x in jnp.argmax(logprobs[:-1], -1)]


def test_bad_input_is_refused(setup):
    _, gen = setup
    with pytest.raises(KestrelError, match="does not fit the model's context of 64"):
        gen.generate([list(range(1, 61)) + [1, 2, 3, 4]], GenerationConfig())
    with pytest.raises(KestrelError, match="outside the vocabulary"):
        gen.score([1, 2, 999])
    with pytest.raises(KestrelError, match="top-p"):
        GenerationConfig(top_p=0.0)
