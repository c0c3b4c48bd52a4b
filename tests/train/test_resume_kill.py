"""``kestrel train`` SIGKILLed right after a checkpoint, then ``--resume``d, equals an uninterrupted run."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from train import loop
from train.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/kestrel_nano_tiny.py")
SETS = ["steps=6", "checkpoint.every_steps=3", "model.num_layers=1",
        "compiler_options={'xla_backend_optimization_level': 0}"]


def cli_args(workdir):
    args = ["--config", CONFIG, "--workdir", str(workdir)]
    for s in SETS:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **{loop.KILL_ENV: "3"})
    killed = subprocess.run([sys.executable, "-m", "train.loop", *cli_args(tmp_path / "run")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(r["step"] for r in read_jsonl(tmp_path / "run/metrics.jsonl")) == [1, 2, 3]

    assert loop.main([*cli_args(tmp_path / "run"), "--resume"]) == 0
    resumed = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run/metrics.jsonl")}

    assert loop.main(cli_args(tmp_path / "straight")) == 0
    straight = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight/metrics.jsonl")}
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
