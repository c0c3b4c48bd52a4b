"""Long-context prefill: time and memory as the context grows, 5:1 sliding/global against all-global.

Each point runs in a fresh process (so its peak RSS is its own): a random tiny model of
``configs/long_context_tiny.py`` (5 sliding layers of window 256 : 1 global layer, YaRN, 262K
positions) prefills a prompt of N tokens through the serving engine's chunked prefill (chunks of
256 tokens, pages of 64), then decodes a few tokens greedily. The memory planner sizes the pools
for exactly that sequence, and the point records the plan beside what happened: KV pages in use per
layer type (the most at any step), peak RSS over the process's RSS before the engine existed, and
prefill and decode time. The peer is the same model with every layer global, at the contexts a
2-core CPU affords; the ratios say what the sliding layers save.

    python bench/long_context.py [--contexts 10000,50000,100000,200000] [--peer-contexts 10000,50000]
                                 [--out bench/results/long_context_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.buckets import MIN_TABLE_PAGES  # noqa: E402

PAGE_SIZE = 64
CHUNK = 256


def tiny_model(all_global: bool = False, seed: int = 0):
    """The long-context tiny model with random weights sharpened x10, so that greedy tokens depend
    on the context (the 0.02 init repeats one token and would hide cache bugs)."""
    import jax
    from flax import nnx

    from configs.long_context_tiny import model as tiny_config
    from model.transformer import init_model

    cfg = tiny_config()
    if all_global:
        cfg = cfg.replace(layer_types=("global",) * cfg.num_layers)
    model = init_model(cfg, seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params))
    return model


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(context: int, *, all_global: bool = False, new_tokens: int = 6, seed: int = 0,
            min_table_pages: int = MIN_TABLE_PAGES) -> dict:
    """Prefills ``context`` random tokens through the engine, decodes ``new_tokens``; see the module.

    ``min_table_pages`` is the runner's smallest page-table bucket: raising it trades a wider
    gather for fewer compilations (tests use it to stay fast).
    """
    import numpy as np

    from serve.engine import Engine, EngineRequest
    from serve.memory_plan import plan_memory
    from serve.request import SamplingParams

    model = tiny_model(all_global, seed)
    cfg = model.config
    plan = plan_memory(cfg, context=context + new_tokens, batch=1, max_output=new_tokens,
                       page_size=PAGE_SIZE, prefill_chunk=CHUNK, min_table_pages=min_table_pages)
    pools = {g.kind: g.num_pages for g in plan.groups}
    prompt = np.random.default_rng(seed).integers(1, cfg.vocab_size, size=context).tolist()
    baseline = rss_mib()
    engine = Engine(model, None, num_pages=pools.get("global", pools.get("sliding")),
                    num_sliding_pages=pools.get("sliding"), page_size=PAGE_SIZE, max_num_seqs=1,
                    max_num_batched_tokens=CHUNK, max_model_len=context + new_tokens)
    engine.runner.min_table_pages = min_table_pages
    kinds = [g.kind for g in plan.groups]
    handle = engine.submit(EngineRequest(prompt_token_ids=prompt, channels=False,
                                         params=SamplingParams(max_tokens=new_tokens, temperature=0.0)))
    most_pages = [0] * len(kinds)
    t0 = time.perf_counter()
    first_token_at = None
    prefill_steps, decode_steps = [], []  # (seconds, whether the step compiled a new shape)
    while not handle.finished:
        variants, start = engine.runner.compiled_variants(), time.perf_counter()
        engine.step()
        step = (time.perf_counter() - start, engine.runner.compiled_variants() > variants)
        (prefill_steps if first_token_at is None else decode_steps).append(step)
        used = engine.scheduler.stats().pages_in_use
        most_pages = [max(a, b) for a, b in zip(most_pages, used)]
        if first_token_at is None and handle.output_token_ids:
            first_token_at = time.perf_counter()
    warm_decode = sorted(s for s, compiled in decode_steps if not compiled)
    per_page = {g.kind: g.bytes_per_token_per_layer * PAGE_SIZE * g.num_layers for g in plan.groups}
    peak = rss_mib()
    return {
        "context": context,
        "layers": "all global" if all_global else "5 sliding (window %d) : 1 global" % cfg.sliding_window,
        "prefill_s": round(first_token_at - t0, 3),
        "prefill_tokens_per_s": round(context / (first_token_at - t0), 1),
        "prefill_steps": len(prefill_steps),
        "prefill_compiling_steps": sum(c for _, c in prefill_steps),
        "prefill_s_in_warm_steps": round(sum(s for s, c in prefill_steps if not c), 3),
        "decode_s_per_token_median": (round(warm_decode[len(warm_decode) // 2], 4)
                                      if warm_decode else None),
        "output_token_ids": handle.output_token_ids,
        "kv_pages_in_use": dict(zip(kinds, most_pages)),
        "kv_mib_in_use": {k: round(n * per_page[k] / 2**20, 3) for k, n in zip(kinds, most_pages)},
        "plan_mib": {"weights": round(plan.weights / 2**20, 3),
                     "kv_cache": {g.kind: round(g.bytes / 2**20, 3) for g in plan.groups},
                     "working_set": round(plan.working_set / 2**20, 3),
                     "total": round(plan.total / 2**20, 3)},
        "planned_minus_weights_mib": round((plan.total - plan.weights) / 2**20, 3),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "rss_growth_mib": round(peak - baseline, 1),
    }


def measure_in_subprocess(context: int, *, timeout: float = 3600, **kw) -> dict:
    """``measure`` in a fresh interpreter, so ``ru_maxrss`` belongs to this point alone."""
    code = ("import json, sys; from bench.long_context import measure; "
            f"print('RESULT ' + json.dumps(measure({context}, **{kw!r})))")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"long-context point {context} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ratios(points: list[dict], peers: list[dict]) -> list[dict]:
    out = []
    for p in peers:
        mine = next((x for x in points if x["context"] == p["context"]), None)
        if mine is not None:
            kv = lambda x: sum(x["kv_mib_in_use"].values())  # noqa: E731
            out.append({"context": p["context"],
                        "kv_in_use_all_global_over_sliding": round(kv(p) / kv(mine), 2),
                        "prefill_time_all_global_over_sliding": round(p["prefill_s"] / mine["prefill_s"], 2),
                        "rss_growth_all_global_over_sliding": round(p["rss_growth_mib"] / mine["rss_growth_mib"], 2)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="10000,50000,100000,200000")
    parser.add_argument("--peer-contexts", default="10000,50000",
                        help="contexts of the all-global peer (its prefill is 6x the attention work)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/long_context_cpu.json"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the points already in --out and measure only the missing ones")
    args = parser.parse_args(argv)
    from bench.common import environment, write_json

    points, peers = [], []
    if args.resume and pathlib.Path(args.out).is_file():
        old = json.loads(pathlib.Path(args.out).read_text())
        points, peers = old["points"], old["all_global_peer"]
    todo = [(int(c), False) for c in args.contexts.split(",") if c]
    todo += [(int(c), True) for c in args.peer_contexts.split(",") if c]
    for context, all_global in todo:
        done = peers if all_global else points
        if any(x["context"] == context for x in done):
            continue
        done.append(measure_in_subprocess(context, all_global=all_global))
        done.sort(key=lambda x: x["context"])
        print(json.dumps(done[-1]), flush=True)
        # Written after every point: the long ones take many minutes on a shared CPU.
        write_json(args.out, {"benchmark": "long_context", "machine": "shared 2-core CPU",
                              "page_size": PAGE_SIZE, "prefill_chunk": CHUNK, "points": points,
                              "all_global_peer": peers, "ratios": _ratios(points, peers),
                              "environment": environment()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
