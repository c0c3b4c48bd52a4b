"""Calibrates a checkpoint's reasoning effort: the budget table and what ``effort=auto`` does.

    python -m train.effort_calibration CKPT [--n 100] [--fc-n N] [--eval-n 100] [--out bench/results/effort.json]

1. Plays `n` held-out STEM problems (with tools) and `fc_n` function-calling ones (seed 1;
   ``kestrel eval`` uses seed 0) through the serving engine at an unbounded budget, and records every turn (its prompt,
   the reasoning tokens spent, whether the reasoning closed) and every problem's outcome. A model
   whose chat template reads ``reasoning_effort`` (trained to heed an effort, ``configs/nano.py``)
   is played at each effort, the hint in its prompts; any other model once, at high.
2. Budgets from the reasoning of turns that closed it (a turn still reasoning at max_new_tokens is
   a runaway, the thing a budget is for). A model that heeds the effort: each effort's budget is
   1.5 x the most that effort spent; otherwise, from the one distribution, ``low`` its median,
   ``medium`` its 90th percentile, ``high`` 1.5 x its maximum. Each rounded up to a multiple of 16
   and kept increasing.
3. ``auto``. A model that heeds the effort sizes its own reasoning, and a budget can only cut it,
   so ``auto`` is a router (``serve.effort.EffortRouter``): fitted on the problems' outcomes at
   each effort, it picks per problem the cheapest effort predicted to answer as well as high. Its
   ridge penalty and tolerance are chosen by 5-fold cross-validation on the calibration problems:
   the most accurate setting that saves 30% of high's reasoning tokens (``select_router``).
   Any other model gets the probe (``serve.effort.EffortProbe``): ridge regression of ``log(1 +
   reasoning tokens)`` on the turn prompt's last hidden state, fitted on 80% of the turns and
   checked on the other 20% (then refitted on all of them).
4. Writes ``CKPT/effort.json``, then plays the eval set (seed 0: `eval_n` STEM problems and `fc_n`
   function-calling ones) at low, medium, high and auto and
   reports accuracy, reasoning tokens per problem and the share of problems that ended in an
   answer (a router's auto also beside the model's own sizing: the auto hint, medium budget); with
   ``--out`` the whole record is saved as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from serve.effort import EffortModel, fit_probe, fit_router, last_user_text
from train import eval as ev

EFFORTS = ("low", "medium", "high", "auto")
UNBOUNDED = 1 << 20
ROUTER_L2 = (0.1, 0.3, 1.0, 3.0, 10.0)
ROUTER_TOLERANCE = (0.0, 0.02, 0.05, 0.1, 0.15)
SAVING = 0.3  # the share of high's reasoning tokens auto aims to save


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
         max_new_tokens: int, log: list | None = None, rows: list | None = None) -> dict:
    """Plays the suites (STEM with tools) through a fresh engine at `effort`; per-suite results
    and timing. `rows` gets every problem's scores, suite by suite in held-out order."""
    engine = ev.eval_engine(model, tokenizer, effort_model)
    policy = ev.engine_policy(engine, max_new_tokens=max_new_tokens, effort=effort)
    if log is not None:
        policy = recording_policy(policy, log)
    out = {}
    for suite, n in suites.items():
        t0 = time.perf_counter()
        res = ev.evaluate(tokenizer, policy, suite, n=n, seed=seed, modes=("tools",), effort=effort,
                          effort_model=effort_model, context_len=model.config.max_position_embeddings)
        played = res["rows"]
        if rows is not None:
            rows.extend(played)
        out[suite] = {
            "n": len(played),
            "accuracy": float(np.mean([r["correct"] for r in played])),
            "reasoning_tokens_per_problem": float(np.mean([r["reasoning_tokens"] for r in played])),
            "answered": float(np.mean([r["stop"] == "answer" for r in played])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def problem_texts(suites: dict[str, int], seed: int) -> list[str]:
    """The last user message of each problem `play` plays, in its order."""
    return [last_user_text(w.prompt_messages()) or "" for suite, n in suites.items()
            for w, _ in ev.heldout_examples(suite, n, seed)]


def select_router(texts: list[str], correct: dict[str, np.ndarray], tokens: dict[str, np.ndarray], *,
                  folds: int = 5) -> tuple[dict, list[dict]]:
    """The router's ridge penalty and tolerance by `folds`-fold cross-validation: each problem is
    routed by a router fitted without it and scored by its outcome at the chosen effort.

    The pick serves ``auto``'s aim, a third fewer reasoning tokens than high at as little accuracy
    lost as possible: the most accurate setting that saves at least `SAVING` of high's tokens;
    where none does, the one that saves the most within a point of high's accuracy; else the
    most accurate.

    Returns:
      (the chosen ``{"l2", "tolerance", "accuracy", "reasoning_tokens"}``, every setting tried).
    """
    n = len(texts)
    order = np.random.default_rng(0).permutation(n)
    tried = []
    for l2 in ROUTER_L2:
        held_parts = [order[k::folds] for k in range(folds)]
        fit_parts = [np.setdiff1d(order, held) for held in held_parts]
        routers = [fit_router([texts[i] for i in fit], {e: c[fit] for e, c in correct.items()},
                              {e: t[fit] for e, t in tokens.items()}, l2=l2)
                   for fit in fit_parts]
        for tol in ROUTER_TOLERANCE:
            picks = {}
            for held, router in zip(held_parts, routers):
                router = dataclasses.replace(router, tolerance=tol)
                picks.update({int(i): router.choose(texts[i]) for i in held})
            tried.append({"l2": l2, "tolerance": tol,
                          "accuracy": float(np.mean([correct[picks[i]][i] for i in range(n)])),
                          "reasoning_tokens": float(np.mean([tokens[picks[i]][i] for i in range(n)]))})
    def most_accurate(settings: list[dict]) -> dict:
        return max(settings, key=lambda t: (t["accuracy"], -t["reasoning_tokens"]))

    saving = [t for t in tried if t["reasoning_tokens"] <= (1 - SAVING) * float(np.mean(tokens["high"]))]
    floor = float(np.mean(correct["high"])) - 0.01 - 1e-9  # (a float sum: exactly one point is within)
    close = [t for t in tried if t["accuracy"] >= floor]
    if saving:
        return most_accurate(saving), tried
    if close:
        return min(close, key=lambda t: t["reasoning_tokens"]), tried
    return most_accurate(tried), tried


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


def calibrate(ckpt: str, *, n: int = 100, eval_n: int = 100, fc_n: int | None = None,
              max_new_tokens: int = 512, out: str | None = None) -> dict:
    from model.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(ckpt)
    if tokenizer is None:
        raise KestrelError(f"{ckpt} has no tokenizer")
    think, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    if think is None or end is None:
        raise KestrelError(f"{ckpt}: the tokenizer has no <think> / </think> tokens; nothing to calibrate")

    # 1. Turns and problems at an unbounded budget (auto: the model's own sizing, unbounded too).
    unbounded = EffortModel({"low": UNBOUNDED, "medium": UNBOUNDED, "high": UNBOUNDED})
    heeds = heeds_effort(tokenizer)
    fc_n = n if fc_n is None else fc_n
    suites = {"stem": n, "tools": fc_n}
    turns: dict[str, tuple[list, np.ndarray, np.ndarray]] = {}
    outcomes: dict[str, list[dict]] = {}
    played: dict[str, dict] = {}
    for effort in (EFFORTS if heeds else ("high",)):
        log: list = []
        outcomes[effort] = []
        played[effort] = play(model, tokenizer, unbounded, effort, suites, seed=1,
                              max_new_tokens=max_new_tokens, log=log, rows=outcomes[effort])
        turns[effort] = ([p for p, _ in log],
                         np.array([ev.think_tokens(ids, think, end) for _, ids in log], np.float64),
                         np.array([end in ids for _, ids in log]))
        print(f"calibration at {effort}: {json.dumps(played[effort])}", flush=True)

    # 2. Budgets from the turns that closed their reasoning.
    def finished(effort: str) -> np.ndarray:
        _, spent, closed = turns[effort]
        return spent[closed] if closed.any() else spent

    if heeds:
        budgets = {e: _ceil16(1.5 * finished(e).max()) for e in ("low", "medium", "high")}
    else:
        spent = finished("high")
        budgets = {"low": _ceil16(np.percentile(spent, 50)), "medium": _ceil16(np.percentile(spent, 90)),
                   "high": _ceil16(1.5 * spent.max())}
    budgets["medium"] = max(budgets["medium"], budgets["low"] + 16)
    budgets["high"] = max(budgets["high"], budgets["medium"] + 16)
    calibration = {"problems": suites, "seed": 1, "heeds_effort": heeds, "played": played,
                   "reasoning_tokens_per_turn_by_effort": {
                       e: {"turns": len(s), "closed": int(c.sum()), "mean": float(s.mean()),
                           "max_closed": float(finished(e).max())} for e, (_, s, c) in turns.items()}}

    # 3. auto: a router for a model that heeds the effort, else the probe.
    if heeds:
        texts = problem_texts(suites, seed=1)
        correct = {e: np.array([float(r["correct"]) for r in outcomes[e]]) for e in EFFORTS}
        tokens = {e: np.array([float(r["reasoning_tokens"]) for r in outcomes[e]]) for e in EFFORTS}
        best, tried = select_router(texts, correct, tokens)
        router = fit_router(texts, correct, tokens, l2=best["l2"], tolerance=best["tolerance"])
        calibration["router"] = {"chosen": best, "cross_validated": tried,
                                 "high": {"accuracy": float(correct["high"].mean()),
                                          "reasoning_tokens": float(tokens["high"].mean())}}
        model_effort = EffortModel(budgets, router=router)
        print(f"router: l2 {best['l2']}, tolerance {best['tolerance']}: cross-validated accuracy "
              f"{best['accuracy']:.3f} at {best['reasoning_tokens']:.1f} reasoning tokens per problem "
              f"(high: {correct['high'].mean():.3f} at {tokens['high'].mean():.1f})", flush=True)
    else:
        prompts, spent, _ = turns["high"]
        model_effort = EffortModel(budgets, fit_auto_probe(model, prompts, spent, budgets, calibration))
    path = model_effort.save(ckpt, calibration)
    print(f"wrote {path}: budgets {budgets}", flush=True)

    # 4. The effort table on the eval set.
    table = {}
    for effort in EFFORTS:
        table[effort] = play(model, tokenizer, model_effort, effort, {"stem": eval_n, "tools": fc_n},
                             seed=0, max_new_tokens=max_new_tokens)
        print(effort, json.dumps(table[effort]), flush=True)
    if heeds:
        table["auto_own_sizing"] = play(model, tokenizer, EffortModel(budgets), "auto", {"stem": eval_n, "tools": fc_n},
                                        seed=0, max_new_tokens=max_new_tokens)
        print("auto, the model's own sizing", json.dumps(table["auto_own_sizing"]), flush=True)
    record = {"benchmark": "effort_calibration", "checkpoint": str(ckpt), "budgets": budgets,
              "calibration": calibration, "eval_seed": 0, "eval_problems": {"stem": eval_n, "tools": fc_n},
              "table": table, "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    return record


def fit_auto_probe(model, prompts: list, spent: np.ndarray, budgets: dict, calibration: dict):
    """The probe for a model that does not heed the effort, checked on held-back turns, then
    refitted on all; its figures go into `calibration`."""
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
    calibration.update(turns=len(spent), probe_heldout={"turns": len(test), "mae_tokens": mae, "correlation": corr,
                                                       "margin": trial.margin, "budget_covers_need": covered},
                       margin=probe.margin)
    print(f"probe on held-back turns: MAE {mae:.1f} tokens, correlation {corr}, budget >= need on "
          f"{covered:.0%}", flush=True)
    return probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=100, help="STEM problems to calibrate on")
    parser.add_argument("--fc-n", type=int, default=None,
                        help="function-calling problems to calibrate on and in the table (default: --n)")
    parser.add_argument("--eval-n", type=int, default=100, help="eval problems per suite and effort")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.n < 2 or args.eval_n < 1 or (args.fc_n is not None and args.fc_n < 1):
        raise SystemExit("--n must be >= 2, --eval-n and --fc-n >= 1")
    try:
        calibrate(args.ckpt, n=args.n, eval_n=args.eval_n, fc_n=args.fc_n, max_new_tokens=args.max_new_tokens,
                  out=args.out)
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
