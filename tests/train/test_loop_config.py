"""Run config loading, ``--set`` overrides, and the input checks made before anything compiles."""

import dataclasses
import pathlib

import jax
import pytest

from configs import kestrel_nano_tiny
from kestrel.errors import KestrelError
from sharding.mesh import MeshConfig
from train import loop
from train.config import RunConfig, apply_overrides, config_keys, load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the run gets as far as building jitted functions."""
    def refuse(*args, **kwargs):
        raise AssertionError("compilation was reached")
    monkeypatch.setattr(loop, "_jitted", refuse)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_loads_and_has_a_tiny_twin(path):
    if path.stem == "__init__":
        return
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    stem = path.stem.removesuffix("_tiny")
    assert (CONFIGS / f"{stem}_tiny.py").is_file(), f"{path.name} has no tiny twin"
    if path.stem.endswith("_tiny"):
        assert cfg.model.num_params < 1_000_000


def test_overrides_are_typed_and_nested():
    cfg = kestrel_nano_tiny.config()
    out = apply_overrides(cfg, ["optimizer.learning_rate=1e-3", "mesh.fsdp=4", "steps=12",
                                "model.num_layers=3", "checkpoint.async_save=false",
                                "distill.teacher=/x/y", "optimizer.decay_steps=50",
                                "optimizer.clip_norm=none", "strategy=fsdp_tp"])
    assert out.optimizer.learning_rate == 1e-3 and out.mesh.fsdp == 4 and out.steps == 12
    assert out.model.num_layers == 3 and len(out.model.layer_types) == 3
    assert out.checkpoint.async_save is False and out.distill.teacher == "/x/y"
    assert out.optimizer.decay_steps == 50 and out.optimizer.clip_norm is None
    assert out.strategy == "fsdp_tp"
    assert cfg.steps != 12  # the original is untouched (frozen)
    assert "optimizer.learning_rate" in config_keys(cfg)


@pytest.mark.parametrize("item,suggestion", [
    ("optimizer.learning_rat=1", "optimizer.learning_rate"),
    ("learning_rate=1", "optimizer.learning_rate"),
    ("mesh.fdsp=2", "mesh.fsdp"),
])
def test_unknown_key_suggests_close_ones(item, suggestion):
    with pytest.raises(KestrelError, match=f"unknown config key; did you mean .*{suggestion}"):
        apply_overrides(kestrel_nano_tiny.config(), [item])


@pytest.mark.parametrize("item,match", [
    ("steps=abc", "steps=abc"), ("steps", "key=value"), ("strategy=zero9", "zero9"),
    ("mesh.data=-1", "at most one axis"), ("distill.weight=2", "distill.weight"),
])
def test_bad_values_are_refused(item, match):
    cfg = dataclasses.replace(kestrel_nano_tiny.config(), mesh=MeshConfig(1, -1, 1))
    with pytest.raises(KestrelError, match=match):
        apply_overrides(cfg, [item])


def test_missing_config_file():
    with pytest.raises(KestrelError, match="does not exist"):
        load_config("configs/no_such_config.py")


def test_mesh_that_does_not_divide_devices(tmp_path, no_compile):
    with pytest.raises(KestrelError, match="needs 6 devices but there are 8"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, ["mesh.data=3", "mesh.fsdp=2"])
    with pytest.raises(KestrelError, match="does not divide the 8 devices"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, ["mesh.fsdp=-1", "mesh.tensor=3"])


def test_batch_not_divisible_by_data_axes(tmp_path, no_compile):
    assert jax.device_count() == 8
    with pytest.raises(KestrelError, match=r"batch_size 6 is not divisible by the data axes \(data=2 x fsdp=2 = 4\)"):
        loop.run(kestrel_nano_tiny.config(), tmp_path,
                 ["data.batch_size=6", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])


def test_unknown_optimizer(tmp_path, no_compile):
    with pytest.raises(KestrelError, match="optimizer.kind must be one of adamw, muon, got 'lion'"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, ["optimizer.kind=lion"])


def test_missing_teacher(tmp_path, no_compile):
    with pytest.raises(KestrelError, match="distill.teacher .* does not exist"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, [f"distill.teacher={tmp_path / 'nope'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KestrelError, match="no config.json"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, [f"distill.teacher={tmp_path / 'empty'}"])


def test_cli_unknown_key(tmp_path, no_compile):
    with pytest.raises(KestrelError, match="did you mean optimizer.warmup_steps"):
        loop.main(["--config", str(CONFIGS / "kestrel_nano_tiny.py"), "--workdir", str(tmp_path),
                   "--set", "optimizer.warmup_step=3"])
    with pytest.raises(KestrelError, match="go together"):
        loop.main(["--config", str(CONFIGS / "kestrel_nano_tiny.py"), "--coordinator", "h:1"])


def test_student_trains_float32_master_weights_with_bf16_compute():
    cfg = apply_overrides(kestrel_nano_tiny.config(), ["compute_dtype=bfloat16",
                                                       "model.param_dtype=bfloat16"])
    assert cfg.student.param_dtype == "float32" and cfg.student.dtype == "bfloat16"
