"""Batch-1 decode speed of `kestrel generate` against transformers on SmolLM2-135M weights.

Both run greedy decoding of the same chat prompt on the same dequantized GGUF weights in one
process, after a warm-up run each; the JSON reports steady-state tokens/s (median of runs) and
the ratio Kestrel / transformers, since this machine is shared and only ratios travel.

    python bench/generate.py [--tokens 128] [--runs 3] [--out bench/results/generate_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import environment, smollm2_gguf, write_json  # noqa: E402

PROMPT = "Explain how a binary search works, step by step, with an example."


def kestrel_speed(ckpt: str, prompt_ids: list[int], tokens: int, runs: int) -> dict:
    from model.checkpoint import load_checkpoint
    from model.generate import GenerationConfig, Generator

    model, _ = load_checkpoint(ckpt)
    generator = Generator(model)
    config = GenerationConfig(max_new_tokens=tokens)  # no stop ids: always `tokens` tokens
    start = time.perf_counter()
    generator.generate([prompt_ids], config)
    compile_s = time.perf_counter() - start
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        out = generator.generate([prompt_ids], config)[0]
        rates.append(len(out.token_ids) / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "first_call_s": compile_s,
            "token_ids": out.token_ids}


def transformers_speed(gguf: str, prompt_ids: list[int], tokens: int, runs: int) -> dict:
    import torch
    import transformers

    folder, name = os.path.split(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates), "runs": rates,
            "token_ids": out[0, ids.shape[1]:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="bench/results/generate_cpu.json")
    args = parser.parse_args()

    from model.convert import convert_checkpoint
    from model.tokenizer import Tokenizer

    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "smollm2")
        convert_checkpoint(gguf, ckpt)
        tok = Tokenizer.load(ckpt)
        prompt_ids = tok.encode(tok.chat_template.render([{"role": "user", "content": PROMPT}],
                                                         add_generation_prompt=True))
        ours = kestrel_speed(ckpt, prompt_ids, args.tokens, args.runs)
    theirs = transformers_speed(gguf, prompt_ids, args.tokens, args.runs)
    same = ours["token_ids"] == theirs["token_ids"]
    payload = {
        "benchmark": "generate batch-1 greedy decode, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "environment": environment(),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.tokens,
        "kestrel_tokens_per_s": ours["tokens_per_s"],
        "transformers_tokens_per_s": theirs["tokens_per_s"],
        "ratio_kestrel_over_transformers": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "kestrel_runs": ours["runs"],
        "transformers_runs": theirs["runs"],
        "kestrel_first_call_s": ours["first_call_s"],
        "same_greedy_tokens": same,
    }
    path = write_json(args.out, payload)
    print(f"kestrel {ours['tokens_per_s']:.1f} tok/s, transformers {theirs['tokens_per_s']:.1f} tok/s, "
          f"ratio {payload['ratio_kestrel_over_transformers']:.2f}, same tokens: {same} -> {path}")


if __name__ == "__main__":
    main()
