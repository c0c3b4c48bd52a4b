"""Function calling scored step by step: where, on held-out requests, a call goes wrong first.

``kestrel eval --suite tools`` scores whole calls; a tiny model that gets few of them right shows
there only *that* it fails. This bench plays the first turn of held-out single-call and no-call
requests (greedy, the generator's ``heldout`` split: function names, parameters and values never
trained on, levels 1-5 in turn, effort high) and scores each step the reasoning scheme of
``train/synthetic/function_calling.py`` takes in order:

- ``action``: the reasoning's first line (the action copied from the request) is the reference's;
- ``offered``: the ``Offered:`` line (the tool list's names copied in order) is the reference's
  (0 for a checkpoint trained before that line existed);
- ``needed``: the ``Needed:`` line (the quoted name the action needs and whether it is offered) is
  the reference's (0 for a checkpoint trained before that line existed);
- ``called``: the turn holds a tool call, per request kind: the choice, right when 1.0 on
  ``fc_single`` and 0.0 on ``fc_none`` (``near_miss``: the no-call requests whose needed name
  shares its verb or object with an offered one, ``far``: the rest);
- ``name``: for single calls, the call names the wanted function.

And, teacher-forced (``lookup``): with the whole reference conversation as input, whether the
token right after ``Needed: "<name>" (`` is ``offered`` / ``not`` as it should be, on held-out
and on training-split requests: the look-up alone, free of the errors before it; 0.5 is chance.
Also on the look-up drill (several needed names under one tool list), the offered names and the
others apart (``drill_offered``, ``drill_not_offered``): whether the drill itself is learned.

    python bench/fc_steps.py CKPT [--n 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TASKS = ("fc_single", "fc_none")
SEED_TAG = "fc_steps"
SEED_BASE = 20_000_000  # the teacher-forced look-up's seeds, apart from the other benches'


def _lines(reasoning: str) -> list[str]:
    return [line.strip() for line in reasoning.replace("<think>", "\n").replace("</think>", "\n").split("\n")
            if line.strip()]


def _line(lines: list[str], prefix: str) -> str | None:
    return next((line for line in lines if line.startswith(prefix)), None)


def _same_line(got: list[str], want: list[str], prefix: str) -> bool:
    """`got` writes the reference's line that starts with `prefix` (False when the reference has none)."""
    line = _line(want, prefix)
    return line is not None and _line(got, prefix) == line


def _near_miss(example) -> bool:
    """The no-call request's function shares its verb or its object with an offered one."""
    from train.synthetic.function_calling import is_near_miss

    name = _line(_lines(example.messages[2]["reasoning_content"]), "Needed:").split('"')[1]
    return is_near_miss(name, [t["function"]["name"] for t in example.tools])


def score_turn(example, text: str) -> dict:
    """One first turn against its reference (``example.messages[2]``, the assistant's opening)."""
    from train.synthetic import parse_tool_calls

    want = _lines(example.messages[2]["reasoning_content"])
    got = _lines(text.split("<tool_call>")[0])
    row = {"action": bool(got) and got[0] == want[0],
           "offered": _same_line(got, want, "Offered:"),
           "needed": _same_line(got, want, "Needed:"),
           "called": "<tool_call>" in text}
    if example.meta["calls"]:
        names = [c.get("name") for c in parse_tool_calls(text) if isinstance(c, dict)]
        row["name"] = example.meta["calls"][0]["name"] in names
    return row


def _rate(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(values) / len(values), 4) if values else None


def decision_positions(tokenizer, ids: list[int], trainable) -> list[int]:
    """The indices of the trainable ``offered`` / ``not`` tokens right after `` (`` in the first
    trainable ``Needed:`` line, one per needed name; empty when the conversation has none."""
    opening = tokenizer.encode(" (")[-1]
    marks = {tokenizer.encode("(offered)")[1], tokenizer.encode("(not offered)")[1]}
    needed = tokenizer.encode("Needed:")
    start = next((j for j in range(len(ids)) if ids[j:j + len(needed)] == needed and trainable[j]), None)
    if start is None:
        return []
    end = next((j for j in range(start, len(ids)) if "\n" in tokenizer.decode([ids[j]])), len(ids))
    return [j for j in range(start, end) if ids[j] in marks and ids[j - 1] == opening]


def lookup(model, tokenizer, n: int) -> dict:
    """Teacher-forced share of right ``offered`` / ``not`` tokens, by split and request kind; and
    on the look-up drill (``train/synthetic/function_calling.py`` ``make_lookup``: several needed
    names under one tool list), apart for the names offered and not."""
    from bench.teacher_forced import next_token_predictor
    from train.packing import tokenize_segments
    from train.synthetic import generate, render_kestrel

    predict = next_token_predictor(model)
    not_mark = tokenizer.encode("(not offered)")[1]
    out = {}
    for split in ("heldout", "train"):
        for task in (*TASKS, "lookup"):
            right, seen = {True: 0, False: 0}, {True: 0, False: 0}
            for i in range(n):
                ex = generate(task, level=1 + i % 5, seed=SEED_BASE + i, split=split)
                enc = tokenize_segments(tokenizer, render_kestrel(ex))
                ids = [int(t) for t in enc.ids]
                positions = decision_positions(tokenizer, ids, enc.trainable)
                if not positions:
                    continue
                pred = predict(ids[:-1])
                for k in positions:
                    offered = ids[k] != not_mark
                    right[offered] += int(pred[k - 1] == ids[k])
                    seen[offered] += 1
            if task == "lookup":
                for offered, key in ((True, "offered"), (False, "not_offered")):
                    out[f"{split}_drill_{key}"] = round(right[offered] / seen[offered], 4) if seen[offered] else None
            else:
                total = sum(seen.values())
                out[f"{split}_{task}"] = round(sum(right.values()) / total, 4) if total else None
    return out


def measure(ckpt: str, n: int, max_new_tokens: int = 160) -> dict:
    from model.checkpoint import load_checkpoint
    from model.generate import Generator
    from train import eval as ev
    from train.data import stream_seed
    from train.synthetic import generate

    model, tokenizer = load_checkpoint(ckpt)
    policy = ev.generator_policy(Generator(model), tokenizer, max_new_tokens=max_new_tokens, batch_size=n)
    out: dict = {"checkpoint": ckpt, "n": n, "max_new_tokens": max_new_tokens}
    for task in TASKS:
        convs = [ev.start(generate(task, level=1 + i % 5, seed=stream_seed(7, i, tag=SEED_TAG), split="heldout",
                                   tools=True), "tools", tokenizer, "high") for i in range(n)]
        ev.run_conversations(convs, policy, tokenizer, max_rounds=1)
        rows = [score_turn(c.example, c.rounds[0]) for c in convs]
        out[task] = {key: _rate(rows, key) for key in ("action", "offered", "needed", "called", "name")}
        if task == "fc_none":
            near = [r for r, c in zip(rows, convs) if _near_miss(c.example)]
            far = [r for r, c in zip(rows, convs) if not _near_miss(c.example)]
            out[task]["called_near_miss"] = _rate(near, "called")
            out[task]["called_far"] = _rate(far, "called")
            out[task]["n_near_miss"] = len(near)
    single, none = out["fc_single"]["called"], out["fc_none"]["called"]
    out["choice_right"] = round((single + (1 - none)) / 2, 4)
    out["lookup"] = lookup(model, tokenizer, n)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=40, help="requests of each kind (single call, no call)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    result = measure(args.checkpoint, args.n, args.max_new_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
