"""Training throughput: tokens/s and MFU of ``train.loop.run`` on a run config.

Runs a short training (checkpoints off) and reports the median step time over the steps after
the first (compilation), tokens/s and MFU from it, as JSON with the machine, versions and date.

    python bench/train_throughput.py --config configs/kestrel_nano.py --steps 30 \\
        [--set key=value ...] [--out bench/results/train_throughput_h200.json]

MFU needs the device's peak FLOP/s; for devices without a datasheet figure (CPUs) the result
instead quotes the model FLOP/s against a measured float32 matmul peak on the same device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

from bench.common import write_json  # noqa: E402
from train import metrics as metrics_lib  # noqa: E402
from train.config import apply_overrides, load_config  # noqa: E402
from train.loop import run  # noqa: E402


def measured_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 [n, n] x [n, n] matmul on the default device: the achievable
    peak MFU is quoted against where the device's datasheet peak is unknown (CPUs)."""
    import time

    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def timed_run(cfg) -> tuple[list[float], list[dict]]:
    """Trains `cfg` in a scratch workdir: the step times (the first, compiling, step has none)
    and every metrics record."""
    with tempfile.TemporaryDirectory() as workdir:
        run(cfg, workdir)
        records = metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
    return [r["step_time_s"] for r in records if r.get("step_time_s")], records


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/kestrel_nano_tiny.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)

    cfg = apply_overrides(load_config(args.config),
                          [f"steps={args.steps}", "checkpoint.every_steps=0", "log_every=1",
                           *args.overrides])
    step_times, records = timed_run(cfg)
    if not step_times:
        raise SystemExit("need at least 2 steps to time")
    median = statistics.median(step_times)
    matmul_peak = measured_matmul_peak()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    device = jax.devices()[0]
    peak = cfg.peak_flops_per_device or metrics_lib.peak_flops(device.device_kind)
    result = {
        "benchmark": "train_throughput",
        "config": args.config,
        "overrides": args.overrides,
        "model_params": cfg.model.num_params,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "strategy": cfg.strategy,
        "compute_dtype": cfg.compute_dtype,
        "devices": jax.device_count(),
        "device_kind": device.device_kind,
        "steps_timed": len(step_times),
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "model_tflops_per_s": flops / median / 1e12,
        "mfu": flops / median / (peak * jax.device_count()) if peak else None,
        "peak_flops_per_device": peak,
        **({} if peak else {"matmul_peak_flops": matmul_peak,
                            "mfu_vs_measured_matmul_peak": flops / median / matmul_peak}),
        "final_loss": records[-1]["loss"],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
