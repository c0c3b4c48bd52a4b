"""Resume equals uninterrupted; corrupted checkpoints fall back; checkpoints move between meshes."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from configs import kestrel_nano_tiny
from model.transformer import init_model
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import optimizer_shardings, param_shardings, strategy_rules
from train.checkpointing import TrainCheckpointer
from train.config import CheckpointConfig
from train.loop import run


def one_layer(cfg):
    """The tiny twin with one block: it compiles in half the time on a CPU."""
    return dataclasses.replace(cfg, model=cfg.model.replace(num_layers=1, layer_types=None))
from train.metrics import read_jsonl
from train.optimizer import make_optimizer
from train.toy_data import ToyBatches

STEPS, EVERY = 6, 3


def config():
    cfg = one_layer(kestrel_nano_tiny.config())
    return dataclasses.replace(
        cfg, steps=STEPS, mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=EVERY, keep=3),
        compiler_options={"xla_backend_optimization_level": 0})


class Crash(Exception):
    pass


class CrashingBatches(ToyBatches):
    """The configured toy source, but the process 'dies' when asked for batch ``crash_at``."""

    def __init__(self, cfg, crash_at):
        super().__init__(cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed)
        self.crash_at = crash_at

    def __next__(self):
        if self.index == self.crash_at:
            raise Crash()
        return super().__next__()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return run(config(), workdir)


def test_resume_after_crash_equals_uninterrupted(tmp_path, uninterrupted):
    cfg = config()
    # Dies right after the checkpoint of step 3, while fetching batch 4 (index 3).
    with pytest.raises(Crash):
        run(cfg, tmp_path, batches=CrashingBatches(cfg, crash_at=EVERY))
    assert TrainCheckpointer(tmp_path / "checkpoints").steps() == [EVERY]
    messages = []
    resumed = run(cfg, tmp_path, resume=True, report=messages.append)
    assert resumed.start_step == EVERY
    assert any("resumed from step 3" in m for m in messages)
    assert sorted(resumed.losses) == list(range(EVERY + 1, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(uninterrupted.losses[step], rel=1e-6), step
    # The JSONL of the workdir holds every step once per run that reached it.
    logged = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert sorted(logged) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([logged[s] for s in range(1, STEPS + 1)],
                               [uninterrupted.losses[s] for s in range(1, STEPS + 1)], rtol=1e-6)


def test_muon_resume_after_crash_equals_uninterrupted(tmp_path):
    """Muon's state (momentum under its partition, AdamW's moments beside it) checkpoints and
    restores like AdamW's."""
    cfg = dataclasses.replace(config(), optimizer=dataclasses.replace(config().optimizer, kind="muon"))
    whole = run(cfg, tmp_path / "whole")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashed", batches=CrashingBatches(cfg, crash_at=EVERY))
    resumed = run(cfg, tmp_path / "crashed", resume=True)
    assert sorted(resumed.losses) == list(range(EVERY + 1, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-6), step


def test_existing_checkpoints_need_resume(uninterrupted):
    from kestrel.errors import KestrelError
    with pytest.raises(KestrelError, match="--resume"):
        run(config(), uninterrupted.workdir)


def _truncate_files(step_dir: pathlib.Path, which: str) -> int:
    """Cuts the parameter files of a step in half: metadata files, or array data chunks."""
    count = 0
    for f in (step_dir / "params").rglob("*"):
        is_data = "d" in f.relative_to(step_dir / "params").parts[:-1]
        if f.is_file() and f.stat().st_size > 16 and is_data == (which == "data"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            count += 1
    return count


@pytest.mark.parametrize("which", ["metadata", "data"])
def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, uninterrupted, which):
    import shutil
    shutil.copytree(uninterrupted.workdir / "checkpoints", tmp_path / "checkpoints")
    assert TrainCheckpointer(tmp_path / "checkpoints").steps() == [EVERY, STEPS]
    assert _truncate_files(tmp_path / "checkpoints" / str(STEPS), which) > 0
    messages = []
    resumed = run(config(), tmp_path, resume=True, report=messages.append)
    assert any(f"step {STEPS}" in m and "unreadable" in m and f"falling back to step {EVERY}" in m
               for m in messages), messages
    assert resumed.start_step == EVERY
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(uninterrupted.losses[step], rel=1e-6)
    # The resumed run wrote a good step 6 again.
    assert TrainCheckpointer(tmp_path / "checkpoints").steps() == [EVERY, STEPS]


def test_checkpoint_restores_onto_another_mesh(uninterrupted):
    """Saved with FSDP over 8 devices; restored on tensor-parallel 2 x 4 and on one device."""
    cfg = config()
    tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    abstract_state = nnx.split(nnx.eval_shape(lambda: init_model(cfg.student, 0)), nnx.Param)[1]
    saved = jax.tree.map(np.asarray, uninterrupted.params)
    saved_mu = jax.tree.map(np.asarray, uninterrupted.opt_state)
    for mesh_cfg, strategy, devices in ((MeshConfig(data=2, fsdp=1, tensor=4), "fsdp_tp", None),
                                        (MeshConfig(1, 1, 1), "dp", jax.devices()[:1])):
        mesh = make_mesh(mesh_cfg, devices)
        p_shard = param_shardings(abstract_state, strategy_rules(strategy), mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abstract_state), p_shard)
        o_target = jax.eval_shape(tx.init, target)
        o_shard = optimizer_shardings(o_target, p_shard, mesh)
        o_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                o_target, o_shard)
        ckpt = TrainCheckpointer(uninterrupted.workdir / "checkpoints")
        r = ckpt.restore(STEPS, params=target, opt_state=o_target,
                         rng=jax.ShapeDtypeStruct((2,), np.uint32))
        ckpt.close()
        assert r.data_state == {"index": STEPS}
        q = r.params["blocks"][0]["attn"]["q_proj"]
        assert q.sharding.mesh.shape == mesh.shape
        assert q.sharding == p_shard["blocks"][0]["attn"]["q_proj"]
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, r.params), saved)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, r.opt_state), saved_mu)
