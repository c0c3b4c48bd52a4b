"""Multi-host start through ``jax.distributed``: explicit flags, or JAX's own auto-detection."""

from __future__ import annotations

import dataclasses
import os

import jax

# Environment variables by which JAX's cluster auto-detection recognises a multi-host job.
_CLUSTER_ENV = {
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "tpu": ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS"),
    "mpi": ("OMPI_COMM_WORLD_SIZE",),
}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host job.

    Attributes:
      mode: ``auto`` joins through JAX's auto-detection when a cluster (TPU pod, SLURM, MPI) is
        detected and runs alone otherwise; ``explicit`` uses the three fields below; ``off`` never
        initialises ``jax.distributed``.
      coordinator_address: ``host:port`` of process 0 (explicit mode).
      num_processes: the number of processes (explicit mode).
      process_id: this process's index in ``[0, num_processes)`` (explicit mode).
      timeout_s: how long to wait for the other processes.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        if self.mode not in ("auto", "explicit", "off"):
            raise ValueError(f"distributed.mode must be auto, explicit or off, got {self.mode!r}")
        if self.mode == "explicit":
            missing = [f for f in ("coordinator_address", "num_processes", "process_id")
                       if getattr(self, f) is None]
            if missing:
                raise ValueError(f"distributed.mode=explicit needs {', '.join(missing)}")
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"distributed.process_id {self.process_id} is not in "
                                 f"[0, {self.num_processes})")


def detected_cluster(environ=os.environ) -> str | None:
    """The kind of multi-host cluster this process runs in (``slurm``, ``tpu``, ``mpi``) or None."""
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if any(k in environ for k in _CLUSTER_ENV["tpu"]):
        hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
        if "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
            return "tpu"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize(config: DistributedConfig) -> bool:
    """Joins the multi-host job the config describes; must run before any JAX computation.

    Returns:
      True when ``jax.distributed`` was initialised, False when this process runs alone.
    """
    if config.mode == "off":
        return False
    if config.mode == "explicit":
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address, num_processes=config.num_processes,
            process_id=config.process_id, initialization_timeout=config.timeout_s)
        return True
    if detected_cluster() is None:
        return False
    # JAX reads the coordinator, process count and id from the cluster's environment.
    jax.distributed.initialize(initialization_timeout=config.timeout_s)
    return True
