"""Mesh construction, logical-axis sharding rules (as data) and multi-host initialisation."""

from sharding.distributed import DistributedConfig, detected_cluster, initialize
from sharding.mesh import AXES, MeshConfig, make_mesh
from sharding.rules import (
    BATCH_AXES,
    STRATEGIES,
    batch_sharding,
    batch_shards,
    logical_to_spec,
    optimizer_shardings,
    param_shardings,
    param_specs,
    strategy_rules,
)

__all__ = [
    "AXES", "BATCH_AXES", "STRATEGIES", "DistributedConfig", "MeshConfig", "batch_sharding",
    "batch_shards", "detected_cluster", "initialize", "logical_to_spec", "make_mesh",
    "optimizer_shardings", "param_shardings", "param_specs", "strategy_rules",
]
