"""Shared pieces of the kernel tests: the tolerance table and the execution modes.

Every kernel test runs in two modes: ``interpret`` (Pallas interpret mode on CPU, the default run)
and ``compiled`` (marked ``gpu``: runs only with KESTREL_TEST_GPU=1 on a machine with a GPU).
"""

import jax
import jax.numpy as jnp
import pytest

# (dtype, what) -> (atol, rtol). One table for every kernel-vs-reference comparison.
TOLERANCES = {
    ("float32", "forward"): (1e-5, 1e-5),
    ("float32", "backward"): (1e-4, 1e-4),
    ("bfloat16", "forward"): (2e-2, 2e-2),
    ("bfloat16", "backward"): (5e-2, 5e-2),
}

MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="compiled", marks=pytest.mark.gpu)]


@pytest.fixture(scope="session")
def tolerance():
    """tolerance(dtype, "forward" | "backward") -> dict(atol=, rtol=) for assert_allclose."""

    def get(dtype, what):
        atol, rtol = TOLERANCES[(jnp.dtype(dtype).name, what)]
        return dict(atol=atol, rtol=rtol)

    return get


@pytest.fixture(params=MODES)
def interpret(request):
    """True: Pallas interpret mode on CPU; False: compiled on a GPU (skipped without one)."""
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled kernels need a GPU (run with KESTREL_TEST_GPU=1 -m gpu)")
    return request.param
