"""int8 KV pages: the write path's per-page scales, and paged attention (reference and Pallas)
reading int8 pages against float pages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import paged_attention, paged_attention_reference
from model.kv_int8 import create_int8_pages, gather_pages, kv_bytes, write_int8_pages

K, G, H, P, MAX_PAGES = 2, 16, 16, 12, 4
# int8 with a per-page absmax scale: an element is off by at most half a step, absmax/254; with
# unit-normal data (absmax ~3.5 over a page) that is ~0.014. Attention outputs average values,
# so their error stays below that; these bounds leave room for the score error's effect.
ELEMENT_ATOL = 0.02
ATTENTION_ATOL = 0.03


def _float_pages(seed):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((K, P, G, H), np.float32)) for _ in range(2))


def _int8_pages(pages):
    """Quantizes whole float pages through the write path, one slot per token."""
    slots = jnp.arange(P * G, dtype=jnp.int32)
    new = pages.reshape(K, P * G, H).transpose(1, 0, 2)  # [N, K, H]
    return write_int8_pages(create_int8_pages(pages.shape), slots, new)


def _dense(pages):
    table = jnp.arange(P, dtype=jnp.int32)[None]
    return gather_pages(pages, table, jnp.float32)[0]  # [S, K, H]


def test_int8_pages_halve_bf16_bytes():
    pages = create_int8_pages((K, P, G, H))
    bf16 = K * P * G * H * 2
    assert pages.qvalue.dtype == jnp.int8 and pages.scale.shape == (K, P, 1, 1)
    assert kv_bytes(pages) == K * P * G * H + K * P * 4
    assert kv_bytes(pages) <= bf16 / 2 * 1.1  # scales: 4 bytes per G x H = 256 elements


def test_token_by_token_writes_grow_scales_and_stay_close():
    """Appending tokens one at a time (scales grow, older tokens are requantized) stays within a
    step or two of the float values, and the per-page scale ends at the page's absmax / 127."""
    k, _ = _float_pages(0)
    pages = create_int8_pages(k.shape)
    write = jax.jit(write_int8_pages)
    flat = k.reshape(K, P * G, H)
    for slot in range(2 * G + 5):  # two full pages and part of a third
        pages = write(pages, jnp.asarray([slot], jnp.int32), flat[:, slot][None])
    got = np.asarray(_dense(pages))[:2 * G + 5]  # [S, K, H]
    want = np.asarray(flat[:, :2 * G + 5].transpose(1, 0, 2))
    np.testing.assert_allclose(got, want, atol=2 * ELEMENT_ATOL)
    absmax = np.abs(np.asarray(k[:, :2])).max(axis=(2, 3))  # [K, 2]
    np.testing.assert_allclose(np.asarray(pages.scale[:, :2, 0, 0]), absmax / 127, rtol=1e-6)
    assert (np.asarray(pages.scale[:, 3:]) == 0).all()  # untouched pages


def test_padding_slots_are_dropped_and_offset_zero_restarts_a_page():
    k, _ = _float_pages(1)
    pages = _int8_pages(k)
    big = jnp.full((1, K, H), 100.0)
    # A padding slot (>= P * G) changes nothing.
    same = write_int8_pages(pages, jnp.asarray([P * G], jnp.int32), big)
    np.testing.assert_array_equal(np.asarray(same.qvalue), np.asarray(pages.qvalue))
    np.testing.assert_array_equal(np.asarray(same.scale), np.asarray(pages.scale))
    # Writing offset 0 of page 5 (a reused page) resets its scale to the new token's range.
    small = jnp.full((1, K, H), 0.5)
    fresh = write_int8_pages(pages, jnp.asarray([5 * G], jnp.int32), small)
    np.testing.assert_allclose(np.asarray(fresh.scale[:, 5, 0, 0]), 0.5 / 127, rtol=1e-6)
    assert (np.asarray(fresh.qvalue[:, 5, 1:]) == 0).all()  # stale values cleared
    np.testing.assert_array_equal(np.asarray(fresh.qvalue[:, 4]), np.asarray(pages.qvalue[:, 4]))


@pytest.mark.parametrize("t,window", [(1, None), (3, 6)])
def test_reference_on_int8_pages_matches_float_pages(t, window):
    k, v = _float_pages(2)
    kq, vq = _int8_pages(k), _int8_pages(v)
    np.testing.assert_allclose(_dense(kq), _dense(k), atol=ELEMENT_ATOL)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((3, t, 4, H), np.float32))
    table = jnp.asarray(rng.permutation(P)[:3 * MAX_PAGES].reshape(3, MAX_PAGES).astype(np.int32))
    lengths = jnp.asarray([t, 37, MAX_PAGES * G], jnp.int32)
    want = paged_attention_reference(q, k, v, table, lengths, window=window)
    got = paged_attention_reference(q, kq, vq, table, lengths, window=window)
    np.testing.assert_allclose(got, want, atol=ATTENTION_ATOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_reads_int8_pages_like_the_reference(interpret, tolerance, dtype):
    """The kernel applies each page's scale to its scores and its weighted values; that equals
    dequantizing first (the reference) up to float rounding."""
    k, v = _float_pages(4)
    kq, vq = _int8_pages(k), _int8_pages(v)
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, H), np.float32), dtype)
    table = np.arange(2 * MAX_PAGES, dtype=np.int32).reshape(2, MAX_PAGES)[:, ::-1].copy()
    lengths = np.array([50, 7], np.int32)
    got = paged_attention(q, kq, vq, table, lengths, impl="pallas", num_splits=2,
                          interpret=interpret)
    want = paged_attention(q, kq, vq, table, lengths, impl="reference")
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **tolerance(dtype, "forward"))


def test_mixed_int8_and_float_pages_are_rejected():
    k, v = _float_pages(6)
    q = jnp.zeros((1, 1, 4, H), jnp.float32)
    with pytest.raises(ValueError, match="both be int8"):
        paged_attention(q, _int8_pages(k), v, np.zeros((1, MAX_PAGES), np.int32),
                        np.array([4], np.int32))
