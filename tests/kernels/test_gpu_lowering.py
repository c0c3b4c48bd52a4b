"""The kernels lower through Pallas-Triton for CUDA, checked without a GPU.

Lowering (``.lower(lowering_platforms=("cuda",))``) runs Pallas' Triton lowering in Python, so
unsupported ops, non-power-of-two blocks or bad block specs fail here, on CPU, long before a GPU
run. Compiling the Triton IR to PTX still needs a GPU (the ``gpu``-marked tests).
"""

import jax
import jax.numpy as jnp
import pytest

from model.kernels import attention, paged_attention


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("t,dtype", [(300, jnp.float32), (128, jnp.bfloat16)])
def test_flash_forward_and_backward_lower_to_triton(t, dtype):
    q, k = _spec((1, t, 4, 64), dtype), _spec((1, t, 2, 64), dtype)
    pos = _spec((1, t), jnp.int32)

    def loss(q, k, v, pos):
        out = attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=pos,
                        kv_segment_ids=pos, window=64, soft_cap=30.0, impl="pallas",
                        interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, pos)
    # One custom call per kernel: forward, dq, dk/dv.
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3


def test_paged_decode_lowers_to_triton():
    text = _lower_for_cuda(
        lambda *a: paged_attention(*a, window=100, impl="pallas", interpret=False),
        _spec((4, 2, 8, 64)), _spec((2, 64, 16, 64)), _spec((2, 64, 16, 64)),
        _spec((4, 16), jnp.int32), _spec((4,), jnp.int32))
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1
