"""Logical-axis rules as data: which mesh axes each logical axis name is sharded over.

Model code names logical axes only (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``vocab``, ``norm``; ``batch`` and ``seq`` for batches). A strategy is a table from those names to
mesh axes, as in MaxText's ``logical_axis_rules``. A rule that would not divide a dimension
evenly, or would reuse a mesh axis already taken in the same array, falls back to replication for
that dimension: small models then still run on any mesh.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Mapping[str, tuple[str, ...]]

BATCH_AXES = ("data", "fsdp")

STRATEGIES: dict[str, Rules] = {
    # Parameters and optimizer state replicated; only the batch is split.
    "dp": {"batch": BATCH_AXES},
    # ZeRO-3 style: parameters sharded along the model width over fsdp, gathered per layer.
    "fsdp": {"batch": BATCH_AXES, "embed": ("fsdp",)},
    # FSDP over the width plus Megatron-style tensor parallelism over heads, MLP and vocabulary.
    "fsdp_tp": {
        "batch": BATCH_AXES,
        "embed": ("fsdp",),
        "heads": ("tensor",),
        "kv_heads": ("tensor",),
        "mlp": ("tensor",),
        "vocab": ("tensor",),
    },
}


def strategy_rules(strategy: str) -> Rules:
    """The rules of a named strategy (``dp``, ``fsdp``, ``fsdp_tp``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy]


def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules,
                    mesh: Mesh) -> P:
    """The PartitionSpec for an array with the given logical axes and shape."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) \
            if name is not None else ()
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(variable.shape)
    return tuple(axes)


def _nested_set(tree: dict, path, value) -> None:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def param_specs(params: nnx.State, rules: Rules, mesh: Mesh) -> dict:
    """PartitionSpecs for a (possibly abstract) parameter State, read from ``logical_axes``.

    Returns:
      A nested dict with the structure of ``nnx.to_pure_dict(params)``.
    """
    out: dict = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, variable in leaves:
        spec = logical_to_spec(_logical_axes(variable), tuple(variable.shape), rules, mesh)
        _nested_set(out, path, spec)
    return out


def param_shardings(params: nnx.State, rules: Rules, mesh: Mesh) -> dict:
    """NamedShardings with the structure of ``nnx.to_pure_dict(params)``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def optimizer_shardings(abstract_opt_state: Any, shardings_of_params: Any, mesh: Mesh) -> Any:
    """Shardings for optimizer state: moments follow their parameter, the rest is replicated.

    A state leaf is a moment of the parameter whose dict path ends its own dict path (Adam's
    ``mu``/``nu``, Muon's momentum under its partition's label), and takes that parameter's
    sharding where it has the rank for it (a reduced statistic would be replicated). Matching by
    path serves optimizers whose ``init`` cannot be traced with optax's parameter placeholder
    (``optax.tree_map_params``), as Muon's partition by parameter name cannot.
    """
    replicated = NamedSharding(mesh, P())
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings_of_params,
                                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {tuple(k.key for k in path): s for path, s in flat}

    def sharding(path, leaf) -> NamedSharding:
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):  # the longest dict-path suffix that names a parameter
            s = by_path.get(keys[i:])
            if s is not None:
                return s if len(s.spec) <= len(getattr(leaf, "shape", ())) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """The sharding of [B, T] batch arrays: B split over the data axes, T whole."""
    axes = tuple((rules or {"batch": BATCH_AXES}).get("batch", BATCH_AXES))
    return NamedSharding(mesh, P(axes, None))


def batch_shards(mesh: Mesh, rules: Rules | None = None) -> int:
    """How many ways the batch dimension is split."""
    axes = (rules or {"batch": BATCH_AXES}).get("batch", BATCH_AXES)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n
