"""A dense per-sequence KV cache for offline generation and scoring.

Each batch row owns slots [0, S); new tokens are written after the row's filled slots with their
absolute positions, and a slot whose position is -1 is empty (masked by attention). The serving
engine keeps KV in pages instead (serve/); this cache is the simple, exact path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from model.config import ModelConfig
from model.layers import DTYPES


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values per layer [B, S, K, H], slot positions [B, S] and fill counts [B]; with a
    pointer (``ModelConfig.pointer_dim``), also each slot's pointer key [B, S, P] and token id
    [B, S] (``model/pointer.py``)."""

    k: tuple[Float[Array, "B S K H"], ...]
    v: tuple[Float[Array, "B S K H"], ...]
    positions: Int[Array, "B S"]
    lengths: Int[Array, "B"]
    pointer_keys: Float[Array, "B S P"] | None = None
    token_ids: Int[Array, "B S"] | None = None

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dt = DTYPES[dtype or cfg.dtype]
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        pointer = {}
        if cfg.pointer_dim:
            pointer = dict(pointer_keys=jnp.zeros((batch, max_len, cfg.pointer_dim), jnp.float32),
                           token_ids=jnp.full((batch, max_len), -1, jnp.int32))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                   positions=jnp.full((batch, max_len), -1, jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32), **pointer)

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def slots(self, t: int) -> Int[Array, "B T"]:
        """Slot indices the next t tokens of each row are written to."""
        return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def write(self, slots: Int[Array, "B T"], values: Float[Array, "B S ..."],
              new: Float[Array, "B T ..."]) -> Float[Array, "B S ..."]:
        rows = jnp.arange(new.shape[0])[:, None]
        return values.at[rows, slots].set(new.astype(values.dtype), mode="drop")

    def advance(self, positions: Int[Array, "B T"]) -> "KVCache":
        """Records the positions of t new tokens and bumps the fill counts (after all layers wrote)."""
        slots = self.slots(positions.shape[1])
        rows = jnp.arange(positions.shape[0])[:, None]
        new_positions = self.positions.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
        return dataclasses.replace(self, positions=new_positions,
                                   lengths=self.lengths + positions.shape[1])
