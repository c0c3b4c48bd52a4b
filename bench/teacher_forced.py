"""Teacher-forced next-token accuracy of a checkpoint on held-out synthetic conversations, by kind
of token: where a small model's answers go wrong before any sampling compounds the errors.

Each held-out example (the generator's ``heldout`` split, STEM and function-calling tasks, levels
1-5 in turn) is rendered as in training; one forward pass scores every trainable token (the
assistant's reasoning, calls and answers) by whether the argmax after its prefix is that token.
Tokens are grouped by

- ``number`` / ``text``: a token made of digits (with ``.``, ``,``, ``-``, ``$``, spaces) or not;
- ``copy`` / ``new``: the token occurs earlier in the conversation (it can be copied) or not;
- ``induction``: among the copies, the pair (previous token, token) occurs earlier too, so a
  head that finds the previous token and reads what followed it predicts it (the induction
  pattern token shift makes one-head; see ``model/token_shift.py``); ``start`` is the rest,
  where the model must first choose *where* to copy from.

Also per task: token accuracy, the share of examples whose every trainable token is right (a
lower bound on what greedy decoding can get fully right), and the share of tool calls (the
tokens from ``<tool_call>`` through ``</tool_call>``) whose every token is right: the teacher-forced
form of function-calling exact match, comparable across tokenizers (token accuracy is not: a
tokenizer with more easy tokens scores higher).

    python bench/teacher_forced.py CKPT [--n 110] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

NUMBER = re.compile(r"^[\s$]*[-0-9.,]*[0-9][-0-9.,]*$")
TASKS = ("arithmetic", "percentages", "word_problems", "linear_equations", "unit_conversion",
         "physics", "chemistry", "combinatorics", "fc_single", "fc_parallel", "fc_none")
SEED_BASE = 10_000_000  # held-out seeds far from kestrel eval's (which count from 0)


def kinds(pieces: list[str], ids: list[int]) -> list[str]:
    """``number|text`` + ``new|induction|start`` of each token after the first (see the module text)."""
    seen, pairs, out = {ids[0]}, set(), []
    for t in range(1, len(ids)):
        prev, target = ids[t - 1], ids[t]
        kind = "number" if NUMBER.match(pieces[t]) else "text"
        if target not in seen:
            out.append(f"{kind}_new")
        else:
            out.append(f"{kind}_{'induction' if (prev, target) in pairs else 'start'}")
        seen.add(target)
        pairs.add((prev, target))
    return out


def calls_right(ids: list[int], trainable, pred, call_open: int, call_close: int) -> list[bool]:
    """For each trainable tool call (``<tool_call>`` .. ``</tool_call>`` as targets), whether every
    one of its tokens was predicted: ``pred[t]`` is the prediction for ``ids[t + 1]``."""
    out, in_call, ok = [], False, True
    for t in range(len(ids) - 1):
        if not trainable[t + 1]:
            continue
        target = ids[t + 1]
        if target == call_open:
            in_call, ok = True, True
        if in_call:
            ok &= bool(pred[t] == target)
            if target == call_close:
                out.append(ok)
                in_call = False
    return out


def next_token_predictor(model):
    """``predict(ids) -> argmax ids``: entry t is the model's greedy guess for the token after
    ``ids[:t + 1]``, from one forward pass padded to a power of two (a few compiled widths, not one
    per length)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def argmax(tokens):
        return jnp.argmax(nnx.merge(graphdef, state)(tokens)[0], -1)

    def predict(ids: list[int]):
        width = 1 << max(len(ids) - 1, 255).bit_length()
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(ids)] = ids
        return np.asarray(argmax(jnp.asarray(padded)))[0, :len(ids)]

    return predict


def measure(ckpt: str, n: int) -> dict:
    from model.checkpoint import load_checkpoint
    from train.packing import tokenize_segments
    from train.synthetic import generate, render_kestrel

    model, tokenizer = load_checkpoint(ckpt)
    predict = next_token_predictor(model)

    right, total = collections.Counter(), collections.Counter()
    task_right, task_total = collections.Counter(), collections.Counter()
    whole, seen = collections.Counter(), collections.Counter()
    calls_ok, calls = collections.Counter(), collections.Counter()
    call_open, call_close = tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        ex = generate(task, level=1 + (i // len(TASKS)) % 5, seed=SEED_BASE + i, split="heldout")
        enc = tokenize_segments(tokenizer, render_kestrel(ex))
        ids = [int(t) for t in enc.ids]
        length = len(ids) - 1
        pred = predict(ids[:-1])
        all_right = True
        token_kinds = kinds([tokenizer.decode([t]) for t in ids], ids)
        for t in range(length):
            if not enc.trainable[t + 1]:
                continue
            target = ids[t + 1]
            kind = token_kinds[t]
            ok = bool(pred[t] == target)
            right[kind] += ok
            total[kind] += 1
            task_right[task] += ok
            task_total[task] += 1
            all_right &= ok
        whole[task] += all_right
        call_results = calls_right(ids, enc.trainable, pred, call_open, call_close)
        calls_ok[task] += sum(call_results)
        calls[task] += len(call_results)
        seen[task] += 1
    return {
        "checkpoint": ckpt, "examples": n,
        "accuracy_by_kind": {k: {"right": right[k], "tokens": total[k], "accuracy": right[k] / total[k]}
                             for k in sorted(total)},
        "by_task": {t: {"token_accuracy": task_right[t] / task_total[t],
                        "examples_all_right": whole[t] / seen[t], "examples": seen[t],
                        **({"calls_all_right": calls_ok[t] / calls[t], "calls": calls[t]} if calls[t] else {})}
                    for t in TASKS if seen[t]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=110, help="held-out examples (10 per task by default)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.n)
    for kind, row in result["accuracy_by_kind"].items():
        print(f"{kind:16s} {row['accuracy']:6.1%} of {row['tokens']:,} tokens")
    for task, row in result["by_task"].items():
        calls = f"   calls all right {row['calls_all_right']:6.1%} of {row['calls']}" if "calls" in row else ""
        print(f"{task:16s} tokens {row['token_accuracy']:6.1%}   examples all right "
              f"{row['examples_all_right']:6.1%}{calls}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
