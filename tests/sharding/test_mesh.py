"""Mesh construction from config and multi-host start options."""

import jax
import pytest
from jax.sharding import AxisType

from sharding.distributed import DistributedConfig, detected_cluster, initialize
from sharding.mesh import AXES, MeshConfig, make_mesh


@pytest.mark.parametrize("cfg,n,expected", [
    (MeshConfig(-1, 1, 1), 8, (8, 1, 1)),
    (MeshConfig(1, -1, 2), 8, (1, 4, 2)),
    (MeshConfig(2, 2, -1), 8, (2, 2, 2)),
    (MeshConfig(2, 4, 1), 8, (2, 4, 1)),
    (MeshConfig(1, 1, 1), 1, (1, 1, 1)),
])
def test_resolve(cfg, n, expected):
    assert cfg.resolve(n) == expected


@pytest.mark.parametrize("cfg,match", [
    (MeshConfig(3, 1, 1), "needs 3 devices but there are 8"),
    (MeshConfig(-1, 3, 1), "does not divide the 8 devices"),
    (MeshConfig(2, 2, 1), "needs 4 devices"),
])
def test_resolve_refuses_meshes_that_do_not_fit(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.resolve(8)


@pytest.mark.parametrize("sizes", [(-1, -1, 1), (0, 1, 1), (1, -2, 1)])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError):
        MeshConfig(*sizes)


def test_make_mesh_has_auto_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    assert one.devices.size == 1


def test_cluster_detection():
    assert detected_cluster({}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"


def test_distributed_config_checks():
    with pytest.raises(ValueError, match="needs coordinator_address, num_processes"):
        DistributedConfig(mode="explicit", process_id=0)
    with pytest.raises(ValueError, match="process_id 2 is not in"):
        DistributedConfig(mode="explicit", coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="mode"):
        DistributedConfig(mode="sometimes")


def test_single_process_does_not_initialise(monkeypatch):
    for key in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE",
                "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert initialize(DistributedConfig(mode="auto")) is False
    assert initialize(DistributedConfig(mode="off")) is False
