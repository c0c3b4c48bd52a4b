"""Which tokens of held-out function calls a training mix ever asks the model to write.

A model learns to write a token only where training makes it a target. Held-out function-calling
examples name unseen functions in plain English, and the tokenizer cuts those names into pieces
("ver" "if" "y", "a" "par" "t" "ment"); a piece that the training mix (almost) never has as a
target has an output embedding that never learned to be chosen, and a call that needs it comes out
garbled even when copying works (teacher-forced, the bundled kestrel-nano wrote "verify_a" then
"esc" for "par"). This counts, without training anything, how often each target token of held-out
function-calling examples is a target in `--n` examples drawn like a config's training mix (its
tasks, tools share and data seed; levels uniform, no effort hints, one example per conversation),
and reports

- the share of held-out target tokens that occur fewer than ``--rare`` times as training targets;
- the share of held-out tool calls (``<tool_call>`` .. ``</tool_call>``) with no such token: the
  calls whose every token the model has at least been trained to write.

    python bench/fc_piece_coverage.py [--config configs/nano.py] [--n 3000] [--heldout 90] [--piece-dropout P] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402

FC_TASKS = ("fc_single", "fc_parallel", "fc_multiturn")


def encode(tokenizer, example):
    """`example` rendered and tokenized as in training (``ids`` and ``trainable``); `tokenizer` may
    be a ``train.piece_dropout.DroppingEncoder``."""
    from train.packing import tokenize_segments
    from train.synthetic import render_kestrel

    return tokenize_segments(tokenizer, render_kestrel(example))


def target_counts(encodings) -> collections.Counter:
    """How often each token id is a trained target in `encodings`."""
    counts = collections.Counter()
    for enc in encodings:
        counts.update(int(t) for t, trained in zip(enc.ids, enc.trainable) if trained)
    return counts


def call_tokens(tokenizer, enc) -> list[list[int]]:
    """The trained tokens inside each tool call of the encoded example `enc`, one list per call."""
    start, end = tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")
    calls, current = [], None
    for t, trained in zip(enc.ids, enc.trainable):
        t = int(t)
        if trained and t == start:
            current = []
        elif t == end and current is not None:
            calls.append(current)
            current = None
        elif current is not None and trained:
            current.append(t)
    return calls


def measure(config: str, n: int, heldout: int, rare: int, piece_dropout: float | None = None) -> dict:
    import numpy as np

    from model.tokenizer import Tokenizer
    from train.config import load_config
    from train.piece_dropout import DroppingEncoder, PieceDropout
    from train.synthetic import generate, mixture

    cfg = load_config(config)
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    rate = cfg.data.piece_dropout if piece_dropout is None else piece_dropout
    # Training text as training encodes it (with the config's piece dropout); held-out text plainly,
    # as the model reads and writes it when served.
    trained = DroppingEncoder(tokenizer, PieceDropout(tokenizer, rate), np.random.default_rng(0)) if rate else tokenizer
    levels = {level: 1.0 for level in range(1, 6)}
    train = target_counts(encode(trained, ex) for ex in mixture(
        cfg.data.seed, levels, "train", n=n, tasks=dict(cfg.data.tasks), tools_fraction=cfg.data.tools_fraction))
    held = [encode(tokenizer, generate(FC_TASKS[i % len(FC_TASKS)], level=1 + (i // len(FC_TASKS)) % 5, seed=i,
                                       split="heldout")) for i in range(heldout)]
    held_targets = target_counts(held)
    total = sum(held_targets.values())
    rare_share = sum(c for t, c in held_targets.items() if train[t] < rare) / total
    calls = [call for enc in held for call in call_tokens(tokenizer, enc)]
    missing = collections.Counter(tokenizer.decode([t]) for call in calls for t in call if train[t] < rare)
    return {"config": config, "piece_dropout": rate, "train_examples": n, "heldout_examples": heldout, "rare_below": rare,
            "heldout_target_tokens": total, "rare_target_share": rare_share,
            "heldout_calls": len(calls), "calls_without_rare_tokens": sum(all(train[t] >= rare for t in call)
                                                                          for call in calls) / len(calls),
            "most_common_rare_in_calls": missing.most_common(25)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/nano.py")
    parser.add_argument("--n", type=int, default=3000, help="training-mix examples counted")
    parser.add_argument("--heldout", type=int, default=90, help="held-out function-calling examples")
    parser.add_argument("--rare", type=int, default=10, help="a token is rare below this many training targets")
    parser.add_argument("--piece-dropout", type=float, default=None,
                        help="the training text's piece dropout (default: the config's data.piece_dropout)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if min(args.n, args.heldout, args.rare) < 1:
        parser.error("--n, --heldout and --rare must be >= 1")
    result = measure(args.config, args.n, args.heldout, args.rare, args.piece_dropout)
    print(f"held-out function-calling target tokens trained fewer than {args.rare} times in {args.n} examples: "
          f"{result['rare_target_share']:.1%}")
    print(f"held-out calls with none of them: {result['calls_without_rare_tokens']:.1%} of {result['heldout_calls']}")
    print("most common in calls:", ", ".join(f"{p!r} x{c}" for p, c in result["most_common_rare_in_calls"]))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
