"""Sharded training equals single-device training (8 simulated CPU devices)."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import kestrel_nano_tiny
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig
from train.loop import run


def one_layer(cfg):
    """The tiny twin with one block: it compiles in half the time on a CPU."""
    return dataclasses.replace(cfg, model=cfg.model.replace(num_layers=1, layer_types=None))

STEPS = 5


def tiny(mesh: MeshConfig, strategy: str):
    cfg = one_layer(kestrel_nano_tiny.config())
    # Optimisation level 0 compiles several times faster on CPU; both sides use it.
    return dataclasses.replace(cfg, steps=STEPS, mesh=mesh, strategy=strategy,
                               checkpoint=CheckpointConfig(every_steps=0),
                               compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    cfg = tiny(MeshConfig(1, 1, 1), "dp")
    result = run(cfg, tmp_path_factory.mktemp("single"), devices=jax.devices()[:1])
    return result.losses, jax.tree.map(np.asarray, result.params)


@pytest.mark.parametrize("mesh,strategy", [
    (MeshConfig(data=8, fsdp=1, tensor=1), "dp"),
    (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp"),
])
def test_sharded_loss_equals_single_device(tmp_path, single_device_losses, mesh, strategy):
    assert len(jax.devices()) == 8
    single_device_losses, single_params = single_device_losses
    result = run(tiny(mesh, strategy), tmp_path)
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    single = np.array([single_device_losses[s] for s in range(1, STEPS + 1)])
    sharded = np.array([result.losses[s] for s in range(1, STEPS + 1)])
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=0)
    # The parameters after the 5th update agree too.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 result.params, single_params)
    # Training moved: the losses are not all the same number.
    assert abs(single[-1] - single[0]) > 1e-3
    # Parameters really are sharded as the strategy says.
    q_proj = result.params["blocks"][0]["attn"]["q_proj"]
    if strategy == "fsdp_tp":
        assert q_proj.sharding.spec[:2] == ("fsdp", "tensor")
        assert len({str(s.index) for s in q_proj.addressable_shards}) == 8
    else:
        assert all(a is None for a in q_proj.sharding.spec)
