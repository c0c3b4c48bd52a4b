"""Paged decode / verify attention (Pallas, split-K) against the gathered-cache reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from model.kernels import paged_attention, paged_attention_reference

# kv heads, page size (>= 16: Triton dots), head dim, pages, pages per sequence
K, G, H, P, MAX_PAGES = 2, 16, 16, 12, 4


def _pages(seed, dtype=jnp.float32):
    """Random k_pages, v_pages [K, P, G, H] (NumPy-generated: no per-test compilation)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((K, P, G, H), np.float32), dtype)
                 for _ in range(2))


@functools.lru_cache(maxsize=None)
def _compiled(impl, t, window, num_splits, soft_cap, interpret):
    """One jitted function per static configuration; tables and lengths are traced."""
    kw = dict(window=window, soft_cap=soft_cap)
    if impl == "pallas":
        kw.update(impl="pallas", num_splits=num_splits, interpret=interpret)
        return jax.jit(lambda *a: paged_attention(*a, **kw))
    return jax.jit(lambda *a: paged_attention_reference(*a, **kw))


@st.composite
def paged_cases(draw):
    b = 3
    t = 3  # verify; decode (T = 1) runs in the tests below
    lengths = draw(st.lists(st.integers(t, MAX_PAGES * G), min_size=b, max_size=b))
    # Each sequence's pages: distinct physical pages drawn from the pool, in any order.
    perm = draw(st.permutations(range(P)))
    table = np.asarray(perm[:b * MAX_PAGES], np.int32).reshape(b, MAX_PAGES)
    window = draw(st.sampled_from([None, 6]))
    return t, np.asarray(lengths, np.int32), table, window


# The fixtures are constants (a mode, a table), so sharing them across examples is safe.
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=paged_cases(), seed=st.integers(0, 2**16))
def test_paged_matches_reference(case, seed, interpret, tolerance):
    """Hypothesis: random lengths, page tables, windows, decode (T=1) and verify (T=3)."""
    t, lengths, table, window = case
    n = 4
    q = jnp.asarray(np.random.default_rng(seed).standard_normal((3, t, n, H), np.float32))
    k_pages, v_pages = _pages(seed + 1)
    args = (q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths))
    got = _compiled("pallas", t, window, 3, None, interpret)(*args)
    want = _compiled("reference", t, window, None, None, None)(*args)
    np.testing.assert_allclose(got, want, **tolerance(jnp.float32, "forward"))


def test_pages_outside_length_and_window_are_not_read(interpret):
    """Pages poisoned with NaN beyond the length and left of the window never reach the output."""
    k_pages, v_pages = (np.array(a) for a in _pages(3))
    table = np.arange(2 * MAX_PAGES, dtype=np.int32).reshape(2, MAX_PAGES)
    lengths = np.array([38, 9], np.int32)
    window = 5
    q = jnp.asarray(np.random.default_rng(4).standard_normal((2, 1, 4, H), np.float32))
    # Copies: on CPU, JAX may alias these NumPy buffers and run asynchronously, so poisoning
    # them in place below could race with the reference computation.
    want = np.asarray(_compiled("reference", 1, window, None, None, None)(
        q, k_pages.copy(), v_pages.copy(), table, lengths))
    # Sequence 0 sees positions 33..37 (logical page 2); sequence 1 sees 4..8 (page 0).
    unread = {0: [0, 1, 3], 1: [1, 2, 3]}
    for row, pages in unread.items():
        for page in pages:
            v_pages[:, table[row, page]] = np.nan
            k_pages[:, table[row, page]] = np.nan
    got = paged_attention(q, k_pages, v_pages, table, lengths, window=window, impl="pallas",
                          num_splits=2, interpret=interpret)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_soft_cap_and_gqa(interpret, tolerance):
    k_pages, v_pages = _pages(5, jnp.bfloat16)
    q = jnp.asarray(np.random.default_rng(6).standard_normal((2, 1, 8, H), np.float32),
                    jnp.bfloat16)
    table = np.arange(2 * MAX_PAGES, dtype=np.int32).reshape(2, MAX_PAGES)[:, ::-1].copy()
    lengths = np.array([1, 64], np.int32)  # a length-1 sequence and a full one
    got = paged_attention(q, k_pages, v_pages, table, lengths, soft_cap=3.0, impl="pallas",
                          num_splits=4, interpret=interpret)
    assert got.dtype == jnp.bfloat16
    want = _compiled("reference", 1, None, None, 3.0, None)(q, k_pages, v_pages, table, lengths)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                               **tolerance(jnp.bfloat16, "forward"))


@pytest.mark.slow
def test_single_split_equals_many_splits():
    """Split-K merging is exact: one split and six splits agree."""
    k_pages, v_pages = _pages(7)
    q = jax.random.normal(jax.random.key(8), (1, 1, 2, H), jnp.float32)
    table = np.arange(MAX_PAGES, dtype=np.int32)[None]
    lengths = np.array([55], np.int32)
    one = paged_attention(q, k_pages, v_pages, table, lengths, impl="pallas", num_splits=1)
    many = paged_attention(q, k_pages, v_pages, table, lengths, impl="pallas", num_splits=4)
    np.testing.assert_allclose(one, many, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(table_value=P), r"page_table\[0, 1\] = 12 points outside"),
    (dict(table_value=-1), r"page_table\[0, 1\]"),
    (dict(lengths=[65, 4]), r"lengths must lie in"),
    (dict(lengths=[0, 4]), r"lengths must lie in"),
    (dict(heads=3), r"multiple of kv heads"),
    (dict(window=0), r"window must be >= 1"),
    (dict(table_rows=3), r"page_table must be \[B, max_pages\]"),
])
def test_bad_input_raises_before_tracing(change, match):
    k_pages, v_pages = _pages(9)
    table = np.arange(2 * MAX_PAGES, dtype=np.int32).reshape(2, MAX_PAGES)
    if "table_value" in change:
        table[0, 1] = change["table_value"]
    if "table_rows" in change:
        table = np.zeros((change["table_rows"], MAX_PAGES), np.int32)
    lengths = np.asarray(change.get("lengths", [20, 4]), np.int32)
    q = jnp.zeros((2, 1, change.get("heads", 4), H), jnp.float32)
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k_pages, v_pages, table, lengths, window=change.get("window"),
                        impl="pallas")


def test_unused_table_entries_are_not_checked():
    """Entries past a sequence's pages may hold anything (the engine leaves them stale)."""
    k_pages, v_pages = _pages(10)
    stale = np.full((1, MAX_PAGES), 10_000, np.int32)
    stale[0, 0] = 3
    clean = np.where(stale == 10_000, 0, stale).astype(np.int32)
    q = jnp.ones((1, 1, 2, H), jnp.float32)
    lengths = np.array([4], np.int32)
    got = paged_attention(q, k_pages, v_pages, stale, lengths, impl="pallas")
    want = paged_attention(q, k_pages, v_pages, clean, lengths, impl="pallas")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t,window,soft_cap", [(1, None, None), (3, 6, None), (1, 6, 3.0)])
def test_grouped_cpu_path_matches_reference(t, window, soft_cap):
    """``auto`` on CPU runs the kv-head-major grouped path; it equals the reference (float
    pages and int8 pages, decode and verify, window, soft cap)."""
    from model.kernels.paged import paged_attention_grouped
    from model.kv_int8 import create_int8_pages, write_int8_pages

    rng = np.random.default_rng(7)
    lengths = jnp.asarray([t, 17, MAX_PAGES * G], jnp.int32)
    table = jnp.asarray(rng.permutation(P)[:3 * MAX_PAGES].reshape(3, MAX_PAGES), jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, t, 4, H), np.float32))
    float_pages = _pages(11)
    int8_pages = tuple(write_int8_pages(create_int8_pages((K, P, G, H)), jnp.arange(P * G),
                                        x.reshape(K, P * G, H).transpose(1, 0, 2)) for x in float_pages)
    for pages in (float_pages, int8_pages):
        kw = dict(window=window, soft_cap=soft_cap)
        got = paged_attention_grouped(q, *pages, table, lengths, **kw)
        want = paged_attention_reference(q, *pages, table, lengths, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":
        auto = paged_attention(q, *float_pages, table, lengths, window=window, soft_cap=soft_cap)
        np.testing.assert_allclose(auto, paged_attention_grouped(q, *float_pages, table, lengths,
                                                                 window=window, soft_cap=soft_cap))
