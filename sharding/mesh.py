"""Device meshes from a run config: axes ``data``, ``fsdp``, ``tensor``; one size may be -1."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. Exactly one may be -1: it takes the devices the others leave.

    Attributes:
      data: pure data parallelism (parameters replicated along it).
      fsdp: data parallelism with parameters and optimizer state sharded along it.
      tensor: tensor (model) parallelism over heads, MLP width and vocabulary.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
        for name, size in zip(AXES, sizes):
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name} must be a positive integer or -1, got {size!r}")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete axis sizes for ``num_devices`` devices.

        Raises:
          ValueError: when the sizes do not multiply to the device count (or -1 cannot fill it).
        """
        sizes = list(self.sizes)
        named = dict(zip(AXES, sizes))
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if num_devices % known:
                raise ValueError(
                    f"mesh {named} does not divide the {num_devices} devices: the fixed axes take "
                    f"{known}, which is not a divisor of {num_devices}")
            sizes[sizes.index(-1)] = num_devices // known
        elif math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {named} needs {math.prod(sizes)} devices but there are {num_devices}; "
                "set one axis to -1 to take the rest")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with Auto axis types over ``devices`` (default: all global devices).

    Auto axes let XLA propagate shardings from the parameters and batch through the model; with
    JAX's default Explicit axes every activation would need an explicit sharding.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))
