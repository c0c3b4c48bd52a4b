"""Decode speed against the memory roofline: batch 1 and batch 64, model loop and serving engine.

A decode step at batch 1 must read every weight once (the tied embedding once, as the LM head)
plus the KV cache so far, so its floor is ``bytes / HBM bandwidth`` and the roofline rate is the
bandwidth over those bytes. This measures, on a random-weight model of a given architecture
(``--shape``: a folder with ``config.json`` and a tokenizer, e.g. a converted SmolLM2-135M whose
``params`` need not be there):

- ``model_loop``: ``model.generate.Generator``, the whole decode loop on device (one dispatch),
  rate from the difference of two lengths so prefill and dispatch cancel;
- ``engine_batch1``: one request through ``serve.Engine`` (continuous batching, paged KV, the
  channel machine; one host round trip per token);
- ``engine_batch64``: 64 requests of different prompt lengths in flight at once.

Each reports output tokens/s and, for batch 1, the fraction of the roofline, against the
bandwidth measured here (a large on-device copy) and against the datasheet's. Random weights
make the text meaningless but the work per token real; every request is forced to its full
length (no stop tokens).

    python bench/decode_roofline.py --shape DIR [--dtype bfloat16] [--tokens 256]
        [--batch 64] [--out bench/results/decode_roofline_h200.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, write_json

# Datasheet HBM bandwidth (bytes/s) by device kind; the measured copy bandwidth is reported beside.
DATASHEET_HBM = (("h200", 4.8e12), ("h100", 3.35e12), ("a100", 2.0e12), ("b200", 8.0e12))

PROMPTS = [
    "Explain how a binary search works, step by step, with an example.",
    "A train leaves at 9:40 and arrives at 13:05. How long is the trip?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the molar mass of calcium carbonate? Show the sum.",
]


def measured_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of an on-device elementwise pass over ``gib`` GiB (read once, written once)."""
    x = jnp.arange(int(gib * 2**30) // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / statistics.median(times)


def param_bytes(model) -> int:
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves))


def kv_bytes_per_token(cfg, itemsize: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def prompt_ids(tok, i: int, repeat: int = 1) -> list[int]:
    text = " ".join([PROMPTS[i % len(PROMPTS)]] * repeat)
    return tok.encode(tok.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)


def model_loop_rate(model, ids: list[int], tokens: int, runs: int) -> dict:
    from model.generate import GenerationConfig, Generator

    gen = Generator(model)
    short, long = GenerationConfig(max_new_tokens=tokens), GenerationConfig(max_new_tokens=2 * tokens)
    gen.generate([ids], short), gen.generate([ids], long)  # compile both
    deltas = []
    for _ in range(runs):
        t0 = time.perf_counter()
        gen.generate([ids], short)
        t1 = time.perf_counter()
        gen.generate([ids], long)
        t2 = time.perf_counter()
        deltas.append((t2 - t1) - (t1 - t0))
    step_s = statistics.median(deltas) / tokens
    if step_s <= 0:  # the extra tokens took less time than the noise between runs
        return {"tokens_per_s": None, "step_ms": None, "deltas_s": [round(d, 4) for d in deltas],
                "note": "too few tokens to time: raise --tokens"}
    return {"tokens_per_s": 1.0 / step_s, "step_ms": step_s * 1e3, "deltas_s": [round(d, 4) for d in deltas]}


def engine_pass(engine, convs, tokens: int) -> dict:
    from serve.engine import EngineRequest
    from serve.request import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    handles = [engine.submit(EngineRequest(messages=c, params=params, store=False, effort="none"))
               for c in convs]
    first = None
    steps0 = engine.num_steps
    while engine.has_work():
        engine.step()
        if first is None and all(h.output_token_ids for h in handles):
            first, first_steps = time.perf_counter(), engine.num_steps
    end = time.perf_counter()
    n = sum(len(h.output_token_ids) for h in handles)
    decode_steps = engine.num_steps - first_steps
    return {"output_tokens": n, "prefill_s": first - t0, "decode_s": end - first,
            "decode_steps": decode_steps, "all_full_length": all(len(h.output_token_ids) == tokens for h in handles),
            "decode_tokens_per_s": (n - len(handles)) / (end - first),
            "step_ms": (end - first) / max(decode_steps, 1) * 1e3, "engine_steps": engine.num_steps - steps0}


def engine_rate(model, tok, convs, tokens: int, runs: int, attn_impl: str) -> dict:
    from serve.engine import Engine

    pages_per_seq = (max(len(prompt_ids(tok, 0, 4)), 64) + tokens) // 16 + 2
    engine = Engine(model, tok, num_pages=len(convs) * pages_per_seq + 8, page_size=16,
                    max_num_seqs=len(convs), max_num_batched_tokens=4096,
                    enable_prefix_caching=False, attn_impl=attn_impl)
    engine_pass(engine, convs, tokens)  # warm-up: compiles every shape the timed passes use
    passes = [engine_pass(engine, convs, tokens) for _ in range(runs)]
    row = {k: passes[-1][k] for k in ("output_tokens", "decode_steps", "all_full_length", "engine_steps")}
    for key in ("prefill_s", "decode_s", "decode_tokens_per_s", "step_ms"):
        row[key] = statistics.median(p[key] for p in passes)
        row[key + "_runs"] = [round(p[key], 4) for p in passes]
    return row


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="a folder with config.json and a tokenizer")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: model_loop,engine_batch1,engine_batch64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from model.checkpoint import load_tokenizer
    from model.config import ModelConfig
    from model.transformer import init_model

    cfg = ModelConfig.from_json((Path(args.shape) / "config.json").read_text())
    cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
    model, tok = init_model(cfg, 0), load_tokenizer(args.shape)
    if tok is None:
        raise SystemExit(f"{args.shape} has no tokenizer")
    itemsize = jnp.dtype(args.dtype).itemsize
    weights = param_bytes(model)
    ids = prompt_ids(tok, 0)
    # Average context over the timed decode (prompt + half the output), all layers' K and V.
    kv = kv_bytes_per_token(cfg, itemsize) * (len(ids) + args.tokens)
    step_bytes = weights + kv
    kind = jax.devices()[0].device_kind
    sheet = next((bw for name, bw in DATASHEET_HBM if name in kind.lower()), None)
    measured = measured_bandwidth(1.0 if jax.default_backend() != "cpu" else 0.25)
    result: dict = {
        "bench": "decode roofline", "environment": environment(), "device_kind": kind,
        "shape": str(args.shape), "architecture": cfg.architecture, "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "dtype": args.dtype,
        "weights": "random (init_model); speed only", "tokens": args.tokens,
        "weight_bytes": weights, "kv_bytes_per_step_batch1": kv, "step_bytes_batch1": step_bytes,
        "measured_copy_bandwidth_bytes_per_s": measured, "datasheet_bandwidth_bytes_per_s": sheet,
        "roofline_tokens_per_s_measured_bw": measured / step_bytes,
        "roofline_tokens_per_s_datasheet_bw": sheet / step_bytes if sheet else None,
    }

    def fraction(rate: float | None) -> dict:
        if rate is None:
            return {}
        return {"fraction_of_roofline_measured_bw": rate * step_bytes / measured,
                **({"fraction_of_roofline_datasheet_bw": rate * step_bytes / sheet} if sheet else {})}

    skip = set(filter(None, args.skip.split(",")))
    if "model_loop" not in skip:
        row = model_loop_rate(model, ids, args.tokens, args.runs)
        result["model_loop_batch1"] = {**row, **fraction(row["tokens_per_s"])}
        print("model_loop_batch1", result["model_loop_batch1"], flush=True)
    convs1 = [[{"role": "user", "content": PROMPTS[0]}]]
    if "engine_batch1" not in skip:
        row = engine_rate(model, tok, convs1, args.tokens, args.runs, args.attn_impl)
        result["engine_batch1"] = {**row, **fraction(row["decode_tokens_per_s"])}
        print("engine_batch1", result["engine_batch1"], flush=True)
    if "engine_batch64" not in skip:
        convs = [[{"role": "user", "content": " ".join([PROMPTS[i % 4]] * (1 + i % 4))}]
                 for i in range(args.batch)]
        row = engine_rate(model, tok, convs, args.tokens, args.runs, args.attn_impl)
        result[f"engine_batch{args.batch}"] = row
        if "engine_batch1" in result:
            row["throughput_vs_batch1"] = row["decode_tokens_per_s"] / result["engine_batch1"]["decode_tokens_per_s"]
        print(f"engine_batch{args.batch}", row, flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
