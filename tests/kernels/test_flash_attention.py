"""Block-sparse flash attention (Pallas) against the plain-jnp reference: forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import random_qkv

from model.kernels import attention

BLOCKS = dict(block_q=16, block_k=16)  # small blocks: several blocks per axis in tiny tests


def _ids(b, n, cuts):
    """[B, n] int32 ids that step up by one at each cut (packed documents / spans)."""
    ids = np.zeros((b, n), np.int32)
    for c in cuts:
        ids[:, c:] += 1
    return ids


def _mask_arrays(case, b, t, s):
    """The array half of a case's mask: positions and ids, as given to ``attention``."""
    arrays = {}
    if case.get("positions") == "cache":
        # Decoding into a cache: keys in slots 0..S-1, the last 8 slots still empty (-1), the
        # queries are the T tokens just written before them.
        filled = s - 8
        kv = np.where(np.arange(s) < filled, np.arange(s), -1)
        arrays["kv_positions"] = np.broadcast_to(kv, (b, s)).astype(np.int32)
        arrays["q_positions"] = np.broadcast_to(np.arange(filled - t, filled), (b, t)).astype(
            np.int32)
    elif case.get("positions") == "given":
        arrays["q_positions"] = np.broadcast_to(np.arange(s - t, s), (b, t)).astype(np.int32)
        arrays["kv_positions"] = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
    if "segments" in case:
        arrays["q_segment_ids"] = _ids(b, t, case["segments"])
        arrays["kv_segment_ids"] = _ids(b, s, case["segments"])
        if case.get("orphans"):
            # The last queries belong to a document with no keys: their rows see nothing.
            arrays["q_segment_ids"][:, -case["orphans"]:] = 99
    if "spans" in case:
        q_span = np.zeros((b, t), np.int32)
        q_span[:, case["spans"][0]:case["spans"][1]] = 1
        arrays["q_span_ids"] = q_span
        arrays["kv_span_ids"] = q_span.copy()
    return {name: jnp.asarray(a) for name, a in arrays.items()}


def _run(impl, q, k, v, arrays, static, interpret=True, grad=False):
    """attention under jit, mask arrays traced (runtime metadata) unless none are given.

    With ``grad``: (output, (dq, dk, dv)) from one compiled function, so a case pays for one
    interpret-mode compilation of the forward and backward kernels together.
    """

    def f(q, k, v, arrays):
        kw = dict(static, impl=impl, **arrays)
        if impl == "pallas":
            kw.update(BLOCKS, interpret=interpret)
        return attention(q, k, v, **kw)

    if not grad:
        return jax.jit(f)(q, k, v, arrays)

    def loss(q, k, v):
        out = f(q, k, v, arrays)
        o, lse = out if static.get("return_lse") else (out, None)
        # A fixed random projection, so every output element gets a distinct cotangent.
        w = jax.random.normal(jax.random.key(7), o.shape, jnp.float32)
        total = jnp.sum(o.astype(jnp.float32) * w)
        if lse is not None:
            total += jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.3)
        return total, out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _compare(got, want, dtype, what, tolerance, err_msg=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   **tolerance(dtype, what), err_msg=err_msg)


# (id, b, t, s, n, k, h, static kwargs, mask-array case)
CASES = [
    ("causal-ragged-softcap-lse", 2, 40, 40, 4, 2, 16,
     dict(causal=True, soft_cap=2.0, return_lse=True), {}),
    ("window-segments-gqa4-orphans", 1, 33, 33, 4, 1, 16, dict(window=7, return_lse=True),
     {"positions": "given", "segments": (10, 21), "orphans": 3}),
    ("span-segments", 1, 32, 32, 2, 1, 16, dict(), {"spans": (8, 20), "segments": (24,),
                                                    "positions": "given"}),
    ("cache-window", 2, 3, 48, 4, 2, 16, dict(window=10), {"positions": "cache"}),
    ("noncausal-cross", 2, 20, 44, 2, 1, 16, dict(causal=False), {}),
    ("window-static", 1, 33, 33, 4, 1, 16, dict(window=7), {}),
    ("segments", 2, 32, 32, 2, 2, 16, dict(), {"segments": (10, 21)}),
]
GRAD_CASES = CASES[:2]  # default run; every other case's gradients run in the slow sweep


@pytest.mark.parametrize("case", CASES[2:5], ids=[c[0] for c in CASES[2:5]])
def test_forward_matches_reference(case, interpret, tolerance):
    _, b, t, s, n, kh, h, static, mask_case = case
    q, k, v = random_qkv(0, b, t, s, n, kh, h)
    arrays = _mask_arrays(mask_case, b, t, s)
    got = _run("pallas", q, k, v, arrays, static, interpret)
    want = _run("reference", q, k, v, arrays, static)
    _compare(got, want, q.dtype, "forward", tolerance)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_forward_and_gradients_match_reference(case, interpret, tolerance):
    _, b, t, s, n, kh, h, static, mask_case = case
    q, k, v = random_qkv(1, b, t, s, n, kh, h)
    arrays = _mask_arrays(mask_case, b, t, s)
    out, grads = _run("pallas", q, k, v, arrays, static, interpret, grad=True)
    ref_out, ref_grads = _run("reference", q, k, v, arrays, static, grad=True)
    _compare(out, ref_out, q.dtype, "forward", tolerance)
    for name, g, w in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), f"d{name} has NaN/inf"
        _compare(g, w, q.dtype, "backward", tolerance, err_msg=f"d{name}")
    if mask_case.get("orphans"):
        # Rows that see no key: zero output, lse = -inf, zero dq; no NaN anywhere.
        o, lse = out
        rows = slice(t - mask_case["orphans"], t)
        np.testing.assert_array_equal(o[:, rows], 0.0)
        assert np.isneginf(np.asarray(lse[:, rows])).all()
        assert np.isfinite(np.asarray(lse[:, :rows.start])).all()
        np.testing.assert_array_equal(grads[0][:, rows], 0.0)


@pytest.mark.parametrize("h", [6, 72])
def test_head_widths_that_are_not_powers_of_two(h, interpret, tolerance):
    """Triton tiles must be powers of two: the kernel runs zero-padded heads (SigLIP's 72, a
    tiny tower's 6) and returns exactly the reference's output and gradients at width h."""
    q, k, v = random_qkv(5, 1, 24, 24, 2, 1, h)
    out, grads = _run("pallas", q, k, v, {}, dict(return_lse=True), interpret, grad=True)
    ref_out, ref_grads = _run("reference", q, k, v, {}, dict(return_lse=True), grad=True)
    assert out[0].shape == q.shape and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    _compare(out, ref_out, q.dtype, "forward", tolerance)
    _compare(grads, ref_grads, q.dtype, "backward", tolerance)


def test_bfloat16_forward(interpret, tolerance):
    q, k, v = random_qkv(2, 1, 32, 32, 4, 2, 16, dtype="bfloat16")
    got = _run("pallas", q, k, v, {}, dict(window=12), interpret)
    assert got.dtype == jnp.bfloat16
    want = _run("reference", q, k, v, {}, dict(window=12))
    _compare(got, want, jnp.bfloat16, "forward", tolerance)


@pytest.mark.parametrize("t,s,window", [
    (1, 1, 1000),
    pytest.param(1, 1, None, marks=pytest.mark.slow),
    pytest.param(5, 5, 1000, marks=pytest.mark.slow),
    pytest.param(1, 17, 3, marks=pytest.mark.slow),
])
def test_tiny_lengths_and_wide_windows(t, s, window, interpret, tolerance):
    """Length-1 sequences, a window wider than the sequence, a single decode query."""
    q, k, v = random_qkv(4, 1, t, s, 2, 1, 16)
    static = dict(window=window)
    got = _run("pallas", q, k, v, {}, static, interpret)
    want = _run("reference", q, k, v, {}, static)
    np.testing.assert_allclose(got, want, **tolerance(q.dtype, "forward"))
    if window == 1000:
        plain = _run("reference", q, k, v, {}, dict())
        np.testing.assert_allclose(got, plain, **tolerance(q.dtype, "forward"))


# The broad sweep: every mask case x dtypes x GQA ratios x odd lengths, forward and backward.
SWEEP = [(case, dtype, ratio, t) for case in CASES for dtype in ("float32", "bfloat16")
         for ratio in (1, 2, 4) for t in (17, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("case,dtype,ratio,t", SWEEP,
                         ids=[f"{c[0]}-{d}-g{r}-t{t}" for c, d, r, t in SWEEP])
def test_sweep(case, dtype, ratio, t, interpret, tolerance):
    name, b, _, _, _, kh, h, static, mask_case = case
    s = t + (8 if name.startswith("cache") else 0) + (11 if "cross" in name else 0)
    t_eff = 3 if name.startswith("cache") else t
    q, k, v = random_qkv(6, b, t_eff, s, kh * ratio, kh, h, dtype=dtype)
    arrays = _mask_arrays({key: val for key, val in mask_case.items()
                           if not (key in ("segments", "spans") and max(val) >= min(t, s))},
                          b, t_eff, s)
    out, grads = _run("pallas", q, k, v, arrays, static, interpret, grad=True)
    ref_out, ref_grads = _run("reference", q, k, v, arrays, static, grad=True)
    _compare(out, ref_out, dtype, "forward", tolerance)
    for name, g, w in zip("qkv", grads, ref_grads):
        _compare(g, w, dtype, "backward", tolerance, err_msg=f"d{name}")
