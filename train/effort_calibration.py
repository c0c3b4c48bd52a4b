"""Calibrates a checkpoint's reasoning effort: the budget table and the ``effort=auto`` probe.

    python -m train.effort_calibration CKPT [--n 100] [--eval-n 100] [--out bench/results/effort.json]

1. Plays held-out STEM and function-calling problems (seed 1; ``kestrel eval`` uses seed 0) through
   the serving engine at an unbounded budget, and records every turn: its prompt and the reasoning
   tokens the model spent on it. A model whose chat template reads ``reasoning_effort`` (trained to
   heed an effort, ``configs/nano.py``) is played at each effort, the hint in its prompts;
   any other model once, at high.
2. Budgets from those reasoning tokens per turn. A model that heeds the effort: each effort's
   budget is 1.5 x the most that effort spent (so a budget cuts only a runaway turn); otherwise,
   from the one distribution, ``low`` its median, ``medium`` its 90th percentile, ``high`` 1.5 x
   its maximum. Each rounded up to a multiple of 16 and kept increasing.
3. The ``auto`` probe (``serve/effort.py``): ridge regression of ``log(1 + reasoning tokens)`` on
   the turn prompt's last hidden state (the turns played at auto when the model heeds the effort,
   else those at high), fitted on 80% of the turns and checked on the other 20% (then refitted on
   all of them).
4. Writes ``CKPT/effort.json``, then plays the eval set (seed 0) at low, medium, high and auto and
   reports accuracy, reasoning tokens per problem and the share of turns that ended in an answer;
   with ``--out`` the whole record is saved as JSON. A model that heeds the effort sizes its own
   reasoning at auto, so auto is also played without the probe (the medium budget a cap): where
   that scores higher on STEM by more than a point, the probe is dropped from ``effort.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kestrel.errors import KestrelError
from serve.effort import EffortModel, fit_probe
from train import eval as ev

EFFORTS = ("low", "medium", "high", "auto")
UNBOUNDED = 1 << 20


def _ceil16(x: float) -> int:
    return int(16 * math.ceil(max(x, 1) / 16))


def heeds_effort(tokenizer) -> bool:
    """Whether the checkpoint's chat template reads ``reasoning_effort``: a model trained with the
    hint (the engine passes a request's effort to every template; others ignore it)."""
    template = tokenizer.chat_template
    return template is not None and "reasoning_effort" in template.source


def recording_policy(policy, log: list):
    """Wraps a policy to keep ``(prompt ids, generated ids)`` of every turn it writes."""
    def wrapped(convs):
        outs = policy(convs)
        log.extend((list(c.context), list(o)) for c, o in zip(convs, outs))
        return outs
    return wrapped


def last_hidden_states(model, prompts: list[list[int]], batch: int = 16) -> np.ndarray:
    """The final hidden state at each prompt's last token, [N, D] (right-padded batches)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, index):
        _, _, hidden = nnx.merge(graphdef, state)(tokens, return_hidden=True)
        return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    out = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for lo in range(0, len(order), batch):
        rows = order[lo:lo + batch]
        width = 128 * math.ceil(max(len(prompts[i]) for i in rows) / 128)
        tokens = np.zeros((batch, width), np.int32)
        index = np.zeros((batch,), np.int32)
        for j, i in enumerate(rows):
            tokens[j, :len(prompts[i])] = prompts[i]
            index[j] = len(prompts[i]) - 1
        hidden = np.asarray(forward(state, jnp.asarray(tokens), jnp.asarray(index)))
        for j, i in enumerate(rows):
            out[i] = hidden[j]
    return out


def play(model, tokenizer, effort_model: EffortModel, effort: str, suites: dict[str, int], seed: int,
         max_new_tokens: int, log: list | None = None) -> dict:
    """Plays the suites through a fresh engine at `effort`; per-suite results and timing."""
    engine = ev.eval_engine(model, tokenizer, effort_model)
    policy = ev.engine_policy(engine, max_new_tokens=max_new_tokens, effort=effort)
    if log is not None:
        policy = recording_policy(policy, log)
    out = {}
    for suite, n in suites.items():
        t0 = time.perf_counter()
        res = ev.evaluate(tokenizer, policy, suite, n=n, seed=seed,
                          context_len=model.config.max_position_embeddings, effort=effort)
        rows = [r for r in res["rows"] if r["mode"] == "tools"]
        out[suite] = {
            "n": len(rows),
            "accuracy": float(np.mean([r["correct"] for r in rows])),
            "reasoning_tokens_per_problem": float(np.mean([r["reasoning_tokens"] for r in rows])),
            "answered": float(np.mean([r["stop"] == "answer" for r in rows])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


SLACK = 8  # tokens added to every auto budget


def coverage_margin(hidden: np.ndarray, spent: np.ndarray, *, cover: float = 0.95, folds: int = 5) -> float:
    """The factor on the probe's prediction that covers the need of a share `cover` of turns.

    A turn whose reasoning is cut short usually loses its answer, so ``auto`` must budget above the
    predicted need, not at it. The ratio need / prediction is measured out of fold (each turn
    predicted by a probe fitted without it) and its `cover` quantile taken, at least 1.
    """
    n = len(spent)
    if n < 2 * folds:
        return 1.5
    order = np.random.default_rng(1).permutation(n)
    ratios = np.empty(n)
    for k in range(folds):
        held = order[k::folds]
        fit = np.setdiff1d(order, held)
        probe = fit_probe(hidden[fit], spent[fit])
        pred = np.array([max(probe.predict_tokens(h), 1.0) for h in hidden[held]])
        ratios[held] = np.maximum(spent[held] - SLACK, 0.0) / pred
    return float(max(1.0, np.quantile(ratios, cover)))


def calibrate(ckpt: str, *, n: int = 100, eval_n: int = 100, max_new_tokens: int = 512,
              out: str | None = None) -> dict:
    from model.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(ckpt)
    if tokenizer is None:
        raise KestrelError(f"{ckpt} has no tokenizer")
    think, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    if think is None or end is None:
        raise KestrelError(f"{ckpt}: the tokenizer has no <think> / </think> tokens; nothing to calibrate")

    # 1. Turns at an unbounded budget (auto without a probe: the medium budget, unbounded too).
    unbounded = EffortModel({"low": UNBOUNDED, "medium": UNBOUNDED, "high": UNBOUNDED})
    heeds = heeds_effort(tokenizer)
    turns: dict[str, tuple[list, np.ndarray]] = {}
    for effort in (EFFORTS if heeds else ("high",)):
        log: list = []
        play(model, tokenizer, unbounded, effort, {"stem": n, "tools": n}, seed=1,
             max_new_tokens=max_new_tokens, log=log)
        turns[effort] = ([p for p, _ in log],
                         np.array([ev.think_tokens(ids, think, end) for _, ids in log], np.float64))

    # 2. Budgets.
    if heeds:
        budgets = {e: _ceil16(1.5 * turns[e][1].max()) for e in ("low", "medium", "high")}
    else:
        spent = turns["high"][1]
        budgets = {"low": _ceil16(np.percentile(spent, 50)), "medium": _ceil16(np.percentile(spent, 90)),
                   "high": _ceil16(1.5 * spent.max())}
    prompts, spent = turns["auto" if heeds else "high"]
    budgets["medium"] = max(budgets["medium"], budgets["low"] + 16)
    budgets["high"] = max(budgets["high"], budgets["medium"] + 16)

    # 3. The probe, checked on held-back turns, then refitted on all.
    hidden = last_hidden_states(model, prompts)
    perm = np.random.default_rng(0).permutation(len(spent))
    cut = int(0.8 * len(perm))
    fit, test = perm[:cut], perm[cut:]
    # The margin comes from the fitting turns alone, so the held-back coverage is an honest check.
    probe_kw = dict(margin=coverage_margin(hidden[fit], spent[fit]), slack=SLACK, min_budget=16,
                    max_budget=budgets["high"])
    trial = fit_probe(hidden[fit], spent[fit], **probe_kw)
    pred = np.array([trial.predict_tokens(h) for h in hidden[test]])
    mae = float(np.mean(np.abs(pred - spent[test])))
    corr = float(np.corrcoef(pred, spent[test])[0, 1]) if len(test) > 2 and spent[test].std() > 0 else None
    covered = float(np.mean([trial.budget(h) >= s for h, s in zip(hidden[test], spent[test])]))
    probe_kw["margin"] = coverage_margin(hidden, spent)
    probe = fit_probe(hidden, spent, **probe_kw)
    calibration = {"turns": len(spent), "problems": 2 * n, "seed": 1, "heeds_effort": heeds,
                   "reasoning_tokens_per_turn_by_effort": {
                       e: {"mean": float(s.mean()), "max": float(s.max())} for e, (_, s) in turns.items()},
                   "reasoning_tokens_per_turn": {"mean": float(spent.mean()), "p50": float(np.percentile(spent, 50)),
                                                 "p90": float(np.percentile(spent, 90)), "max": float(spent.max())},
                   "probe_heldout": {"turns": len(test), "mae_tokens": mae, "correlation": corr,
                                     "margin": trial.margin, "budget_covers_need": covered},
                   "margin": probe.margin}
    model_effort = EffortModel(budgets, probe)
    path = model_effort.save(ckpt, calibration)
    print(f"wrote {path}: budgets {budgets}; probe on held-back turns: MAE {mae:.1f} tokens, "
          f"correlation {corr}, budget >= need on {covered:.0%}", flush=True)

    # 4. The effort table on the eval set.
    table = {}
    for effort in EFFORTS:
        table[effort] = play(model, tokenizer, model_effort, effort, {"stem": eval_n, "tools": eval_n},
                             seed=0, max_new_tokens=max_new_tokens)
        print(effort, json.dumps(table[effort]), flush=True)
    if heeds:
        # A model that heeds the hint sizes its own reasoning at auto; the probe can then only cut
        # it. Keep the probe only where it costs no STEM accuracy against auto under the medium cap.
        capped = play(model, tokenizer, EffortModel(budgets), "auto", {"stem": eval_n, "tools": eval_n},
                      seed=0, max_new_tokens=max_new_tokens)
        print("auto without the probe", json.dumps(capped), flush=True)
        calibration["auto_with_probe"], calibration["auto_without_probe"] = table["auto"], capped
        if capped["stem"]["accuracy"] > table["auto"]["stem"]["accuracy"] + 0.01:
            calibration["probe_dropped"] = "auto scored higher under the medium cap than under the probe's budgets"
            model_effort = EffortModel(budgets)
            model_effort.save(ckpt, calibration)
            table["auto"] = capped
            print(f"dropped the probe from {path}: {calibration['probe_dropped']}", flush=True)
    record = {"benchmark": "effort_calibration", "checkpoint": str(ckpt), "budgets": budgets,
              "calibration": calibration, "eval_seed": 0, "eval_problems_per_suite": eval_n,
              "table": table, "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=100, help="calibration problems per suite")
    parser.add_argument("--eval-n", type=int, default=100, help="eval problems per suite and effort")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.n < 2 or args.eval_n < 1:
        raise SystemExit("--n must be >= 2 and --eval-n >= 1")
    try:
        calibrate(args.ckpt, n=args.n, eval_n=args.eval_n, max_new_tokens=args.max_new_tokens, out=args.out)
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
