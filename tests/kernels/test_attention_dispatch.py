"""The attention entry point: input checks, backend dispatch and the TPU splash route."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import random_qkv

from model.kernels import attention, resolve_impl
from model.kernels.tpu_splash import splash_attention, splash_fits
from model.kernels.mask import MaskDescription
from model.kernels.attention import default_positions
from model.kernels.grouped import key_ranges


def _pos(b, n):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))


@pytest.mark.parametrize("shapes,kw,match", [
    (((1, 4, 2, 8), (1, 4, 1, 4)), {}, "batch or head dim"),
    (((1, 4, 3, 8), (1, 4, 2, 8)), {}, "multiple of kv heads"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(window=0), "window must be >= 1"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(q_positions=jnp.zeros((1, 5), jnp.int32),
                                        kv_positions=jnp.zeros((1, 4), jnp.int32)), "q_positions"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(q_segment_ids=jnp.zeros((1, 4), jnp.int32)),
     "given together"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(q_positions=jnp.zeros((1, 4), jnp.int32)),
     "q_positions and kv_positions"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(soft_cap=0.0), "soft_cap"),
    (((1, 4, 2, 8), (1, 4, 1, 8)), dict(impl="triton"), "impl must be"),
])
def test_bad_input_raises_value_error(shapes, kw, match):
    q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, **{"impl": "pallas", **kw})


def test_auto_is_reference_on_cpu_and_pallas_on_accelerators():
    assert resolve_impl("auto", "cpu") == "reference"
    assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "pallas"
    assert resolve_impl("xla", "gpu") == "xla"


@pytest.mark.parametrize("kw", [dict(window=6), dict(causal=False, segments=True)])
def test_xla_backend_matches_reference(kw):
    q, k, v = random_qkv(0, 2, 12, 12, 4, 2, 8)
    args = {}
    if kw.pop("segments", False):
        seg = np.ones((2, 12), np.int32)
        seg[:, 5:] = 2
        seg[0, :] = 3  # row 0: one document
        seg_q = seg.copy()
        seg_q[1, -1] = 7  # a query that sees nothing: zeros, as in the reference
        args = dict(q_segment_ids=jnp.asarray(seg_q), kv_segment_ids=jnp.asarray(seg))
    got = attention(q, k, v, impl="xla", **kw, **args)
    want = attention(q, k, v, impl="reference", **kw, **args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_xla_backend_refuses_soft_cap():
    q, k, v = random_qkv(0, 1, 4, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="soft cap"):
        attention(q, k, v, impl="xla", soft_cap=5.0)


@pytest.mark.gpu
def test_cudnn_backend_matches_reference():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    q, k, v = random_qkv(0, 2, 256, 256, 4, 2, 64, dtype="bfloat16")
    got = attention(q, k, v, impl="cudnn", window=64)
    want = attention(q, k, v, impl="reference", window=64)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)


def test_splash_route_matches_reference():
    """The TPU route (splash attention, interpret mode here) on a windowed segment mask."""
    b, t = 1, 128
    q, k, v = random_qkv(1, b, t, t, 2, 1, 128)
    qp, kp = default_positions(b, t, t)
    seg = np.ones((b, t), np.int32)
    seg[:, 50:] = 2
    mask = MaskDescription(qp, kp, True, 32, jnp.asarray(seg), jnp.asarray(seg))
    assert splash_fits(mask, q.shape, k.shape, None)
    got = splash_attention(q, k, v, mask, scale=128 ** -0.5, soft_cap=None, interpret=True)
    want = attention(q, k, v, impl="reference", window=32, q_segment_ids=jnp.asarray(seg),
                     kv_segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_route_refuses_runtime_positions_and_spans():
    qp, kp = default_positions(1, 128, 128)
    shapes = ((1, 128, 2, 128), (1, 128, 1, 128))
    assert not splash_fits(MaskDescription(qp + 1, kp + 1), *shapes, None)  # shifted positions
    spans = np.zeros((1, 128), np.int32)
    assert not splash_fits(MaskDescription(qp, kp, True, None, None, None, spans, spans),
                           *shapes, None)
    assert not splash_fits(MaskDescription(qp[:, :64], kp), (1, 64, 2, 128), shapes[1], None)


def test_grouped_matches_the_reference_forward_and_backward():
    """impl="grouped" (kv-head-major plain jnp, what CPU training can run): packed documents,
    a window, a soft cap, an image span and GQA, values and gradients; asked for the lse it
    answers with the reference's."""
    q, k, v = random_qkv(11, 2, 24, 24, 4, 2, 16)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 2, axis=0), jnp.int32)
    span = jnp.asarray(np.repeat([[0] * 12 + [1] * 4 + [0] * 8], 2, axis=0), jnp.int32)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_span_ids=span, kv_span_ids=span, window=9,
              soft_cap=3.0, scale=0.3)
    w = jax.random.normal(jax.random.key(3), q.shape)

    def run(impl):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **kw) * w)  # noqa: E731
        return attention(q, k, v, impl=impl, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    (out, grads), (ref, ref_grads) = run("grouped"), run("reference")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
    o, lse = attention(q, k, v, impl="grouped", return_lse=True, **kw)
    o_ref, lse_ref = attention(q, k, v, impl="reference", return_lse=True, **kw)
    np.testing.assert_array_equal(lse, lse_ref)


def test_key_ranges_give_each_query_chunk_only_the_keys_it_may_see():
    """Static positions bound each chunk's keys by causality and the window; runtime positions
    only on the caller's word that the keys are the queries' own ascending sequence; spans (a
    later key may be visible) or no causality leave the one whole range."""
    qp, kp = default_positions(1, 8, 8)
    mask = MaskDescription(qp, kp, causal=True)
    assert key_ranges(mask, 8, 8, keys_in_query_order=False, chunk=3) == [
        (0, 3, 0, 3), (3, 6, 0, 6), (6, 8, 0, 8)]
    windowed = MaskDescription(qp, kp, causal=True, window=2)
    assert key_ranges(windowed, 8, 8, keys_in_query_order=False, chunk=4) == [(0, 4, 0, 4), (4, 8, 3, 8)]
    # Queries are the last 4 of 8 keys (a prefill after a cached prefix); an empty slot (-1) last.
    qp, kp = default_positions(1, 4, 8)
    kp = kp.copy()
    kp[0, -1] = -1
    assert key_ranges(MaskDescription(qp, kp), 4, 8, keys_in_query_order=False, chunk=2) == [
        (0, 2, 0, 6), (2, 4, 0, 7)]
    qp, kp = default_positions(1, 8, 8)
    spans = jnp.zeros((1, 8), jnp.int32)
    with_spans = MaskDescription(qp, kp, q_span_ids=spans, kv_span_ids=spans)
    assert key_ranges(with_spans, 8, 8, keys_in_query_order=True, chunk=4) == [(0, 8, 0, 8)]
    assert key_ranges(MaskDescription(qp, kp, causal=False), 8, 8, keys_in_query_order=True,
                      chunk=4) == [(0, 8, 0, 8)]

    def traced(ordered):
        out = []
        jax.jit(lambda p: out.append(key_ranges(MaskDescription(p, p), 8, 8, keys_in_query_order=ordered,
                                                chunk=4)) or p)(jnp.asarray(qp))
        return out[0]

    assert traced(False) == [(0, 8, 0, 8)]
    assert traced(True) == [(0, 4, 0, 4), (4, 8, 0, 8)]


@pytest.mark.parametrize("window", [None, 40])
def test_chunked_grouped_attention_equals_the_reference_on_a_packed_batch(window):
    """impl="grouped" over a packed batch (runtime positions restarting per document, ascending
    padding last) with keys_in_query_order, cut into query chunks: values and gradients equal the
    reference's, which scores every key."""
    import model.kernels.grouped as grouped

    b, t = 2, 80
    q, k, v = random_qkv(5, b, t, t, 4, 2, 16)
    seg = np.zeros((b, t), np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    for row, cuts in enumerate(([0, 30, 55, 70], [0, 64, 75])):
        for d, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            seg[row, lo:hi], pos[row, lo:hi] = d + 1, np.arange(hi - lo)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    w = jax.random.normal(jax.random.key(4), q.shape)

    def run(impl, **extra):
        def call(q, k, v):
            return attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                             kv_segment_ids=seg, window=window, scale=0.3, impl=impl, **extra)
        out, vjp = jax.vjp(call, q, k, v)
        return out, vjp(w)

    chunk = grouped.QUERY_CHUNK
    grouped.QUERY_CHUNK = 16
    try:
        out, grads = jax.jit(lambda: run("grouped", keys_in_query_order=True))()
    finally:
        grouped.QUERY_CHUNK = chunk
    ref, ref_grads = run("reference")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
