"""Random kernel inputs shared by the kernel tests (a plain module: conftest names collide)."""

import jax.numpy as jnp
import numpy as np


def random_qkv(seed, b, t, s, n, k, h, dtype="float32"):
    """Normal q [B, T, N, H], k and v [B, S, K, H] in dtype (NumPy RNG: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
