"""Two processes on localhost through ``jax.distributed`` train exactly like one process."""

import os
import pathlib
import subprocess
import sys

import portpicker
import pytest

from train.loop import run
from train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["steps=3", "checkpoint.every_steps=2", "mesh.data=2", "mesh.fsdp=-1",
             "compiler_options={'xla_backend_optimization_level': 0}"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    workdir = tmp_path / "two"
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "train.loop", "--config", "configs/kestrel_nano_tiny.py",
               "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(pid)]
        for o in OVERRIDES:
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    two = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")}
    assert sorted(two) == [1, 2, 3]
    # Both processes took part in the checkpoint (each wrote its own shards).
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]

    one = run(str(ROOT / "configs/kestrel_nano_tiny.py"), tmp_path / "one", OVERRIDES)
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one.losses[step], rel=1e-5), step
