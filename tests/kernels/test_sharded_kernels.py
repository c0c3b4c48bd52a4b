"""The kernels under a 2 x 2 mesh (batch x heads), through shard_map, equal the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import random_qkv
from jax.sharding import Mesh

from model.kernels import (attention, paged_attention_reference, sharded_attention,
                           sharded_paged_attention)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    # sharding/rules.py's axis names: batch over data (and fsdp), heads over tensor.
    return Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))


def test_sharded_attention_forward_and_gradients(mesh):
    q, k, v = random_qkv(0, 2, 24, 24, 4, 2, 16)
    seg = np.ones((2, 24), np.int32)
    seg[1, 10:] = 2
    kw = dict(window=9, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    sharded = lambda q, k, v: sharded_attention(  # noqa: E731
        q, k, v, mesh=mesh, impl="pallas", block_q=16, block_k=16, **kw)
    plain = lambda q, k, v: attention(q, k, v, impl="reference", **kw)  # noqa: E731
    got = jax.jit(sharded)(q, k, v)
    np.testing.assert_allclose(got, jax.jit(plain)(q, k, v), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_sharded_paged_attention(mesh):
    rng = np.random.default_rng(1)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((2, 12, 4, 16), np.float32))
                        for _ in range(2))
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16), np.float32))
    table = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6)[:, ::-1].copy())
    lengths = jnp.asarray([7, 21], jnp.int32)
    got = jax.jit(lambda *a: sharded_paged_attention(*a, mesh=mesh, impl="pallas", window=8))(
        q, k_pages, v_pages, table, lengths)
    want = paged_attention_reference(q, k_pages, v_pages, table, lengths, window=8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_indivisible_heads_are_refused(mesh):
    q, k, v = random_qkv(2, 2, 8, 8, 2, 1, 16)
    with pytest.raises(ValueError, match=r"do not divide over mesh axis \('tensor',\)"):
        sharded_attention(q, k, v, mesh=mesh, impl="pallas")
