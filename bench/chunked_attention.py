"""Training step time with and without causal query chunks in the ``grouped`` attention.

``model/kernels/grouped.py`` cuts a causal sequence's queries into chunks and scores each chunk
only over the keys it may see. This runs a config's training (``train.loop.run``, checkpoints
off) in alternating rounds, chunked (``QUERY_CHUNK`` as shipped) and unchunked (one chunk: every
query scores every key, as before), and reports the median step time of each, and their ratio,
from the same process on the same noisy machine.

    python bench/chunked_attention.py [--config configs/nano.py] [--steps 12] [--rounds 3] \\
        [--out bench/results/chunked_attention_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import model.kernels.grouped as grouped  # noqa: E402
from bench.common import environment, write_json  # noqa: E402
from bench.train_throughput import timed_run  # noqa: E402
from train import loop  # noqa: E402
from train.config import apply_overrides, load_config  # noqa: E402


def step_times(cfg, query_chunk: int) -> tuple[list[float], float]:
    """Per-step times (the first, compiling, step left out) and the last loss of one short run."""
    grouped.QUERY_CHUNK = query_chunk
    loop._JIT_CACHE.clear()  # the chunking is decided at trace time: trace afresh
    times, records = timed_run(cfg)
    return times, records[-1]["loss"]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/nano.py")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cfg = apply_overrides(load_config(args.config), [f"steps={args.steps}", "checkpoint.every_steps=0",
                                                     "log_every=1", *args.overrides])
    if cfg.attention != "grouped":
        raise SystemExit(f"{args.config} trains with attention={cfg.attention!r}; the chunks are the "
                         "grouped path's (--set attention=grouped)")
    shipped = grouped.QUERY_CHUNK
    variants = {"chunked": shipped, "unchunked": 1 << 30}
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, chunk in variants.items():
            got, losses[name] = step_times(cfg, chunk)
            times[name] += got
    grouped.QUERY_CHUNK = shipped
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = cfg.data.batch_size * cfg.data.seq_len
    result = {
        "benchmark": "chunked_attention",
        "config": args.config, "overrides": args.overrides,
        "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "query_chunk": shipped,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "median_step_s": median,
        "tokens_per_s": {name: tokens / m for name, m in median.items()},
        "speedup": median["unchunked"] / median["chunked"],
        "final_loss": losses,
        "environment": environment(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
