"""What a pointer (``ModelConfig.pointer_dim``, ``model/pointer.py``) costs the serving engine.

Two kestrel-nano-shaped models with random weights, the same but for the pointer, serve the same
raw greedy requests through the engine (paged prefill and decode; the pointer gathers each
sequence's keys and token ids from the pages at every step). Both are warmed up with a full
untimed pass, then timed rounds alternate between them so both see the same load on a shared
machine. Reports the median output tokens/s of each and their ratio.

    python bench/pointer_cost.py [--requests 16] [--prompt-tokens 400] [--max-new-tokens 64]
        [--rounds 3] [--out bench/results/pointer_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import write_json  # noqa: E402
from configs.nano import config as nano_config  # noqa: E402
from model.transformer import init_model  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402


def serve_once(engine: Engine, prompts: list[list[int]], max_new: int) -> tuple[float, int]:
    """Wall seconds and output tokens of serving ``prompts`` to completion."""
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    start = time.perf_counter()
    handles = [engine.submit(EngineRequest(prompt_token_ids=p, channels=False, params=params)) for p in prompts]
    engine.run_until_idle()
    return time.perf_counter() - start, sum(len(h.output_token_ids) for h in handles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pointer-dim", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    base = nano_config().model
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(10, base.vocab_size, size=args.prompt_tokens - 20 * (i % 4))]
               for i in range(args.requests)]
    engines = {}
    for name, dim in (("plain", 0), ("pointer", args.pointer_dim)):
        model = init_model(base.replace(pointer_dim=dim), seed=0)
        engines[name] = Engine(model, None, num_pages=1024, page_size=16, max_num_seqs=args.requests,
                               max_num_batched_tokens=512, prefill_chunk_size=256)
        for _ in range(2):  # compiles the shapes (the first pass's batches differ from later ones)
            serve_once(engines[name], prompts, args.max_new_tokens)
    rates = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            seconds, tokens = serve_once(engine, prompts, args.max_new_tokens)
            rates[name].append(tokens / seconds)
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "benchmark": "pointer_cost",
        "question": "output tokens/s of the engine serving a kestrel-nano-shaped model with and without a pointer",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend()},
        "setup": {"requests": args.requests, "prompt_tokens": f"{args.prompt_tokens - 60}-{args.prompt_tokens}",
                  "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "pointer_dim": args.pointer_dim,
                  "model": "configs/nano.py's shape, random weights, greedy raw requests"},
        "output_tokens_per_s": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        "median_output_tokens_per_s": {name: round(x, 1) for name, x in median.items()},
        "pointer_over_plain": round(median["pointer"] / median["plain"], 3),
    }
    print(f"plain {median['plain']:.0f} tok/s, pointer {median['pointer']:.0f} tok/s: "
          f"ratio {result['pointer_over_plain']:.3f}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
