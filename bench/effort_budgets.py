"""Does every response answer under each effort's reasoning budget?

The first turns of held-out STEM problems (with the calculator and python) and function-calling
problems, played through the serving engine at each effort of the checkpoint's ``effort.json``
(``auto``: its router or probe), greedy, with a turn limit above the largest budget, so a turn
that reasons to its budget meets the channel machine's hand-off (Qwen3's sentence, then
``</think>``) before the limit. Per effort and suite: reasoning tokens per turn (mean, max), the
share of turns whose reasoning closed (by the model or by the hand-off), the share the hand-off
closed, the share that went on to an answer or a tool call, and the finish reasons (``length``:
the answer or a call's arguments ran on to the turn limit).

    python bench/effort_budgets.py [CKPT] [--n 100] [--out bench/results/effort_budgets_cpu.json]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import environment, write_json  # noqa: E402
from serve import events as ev  # noqa: E402
from serve.effort import EffortModel  # noqa: E402
from serve.engine import EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402
from train import eval as evaluation  # noqa: E402

EFFORTS = ("low", "medium", "high", "auto")
ANSWER_ROOM = 256  # tokens of the turn limit beyond the largest budget


def first_turns(model, tokenizer, effort_model: EffortModel, effort: str, suite: str, n: int,
                max_tokens: int) -> dict:
    """Plays the first turn of `n` held-out problems of `suite` at `effort`; the turn statistics."""
    engine = evaluation.eval_engine(model, tokenizer, effort_model)
    convs = [evaluation.start(w, "tools", tokenizer, effort, effort_model)
             for w, _ in evaluation.heldout_examples(suite, n, seed=0)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    handles = [engine.submit(EngineRequest(
        prompt_token_ids=c.context, tools=c.example.tools, store=False, params=params,
        effort=c.served_effort(effort))) for c in convs]
    engine.run_until_idle()
    reasoning, closed, forced, answered = [], 0, 0, 0
    for h in handles:
        done = [e for e in h.events if isinstance(e, ev.ReasoningDone)]
        reasoning.append(h.usage.reasoning_tokens)
        closed += bool(done)
        forced += bool(done and done[0].forced)
        answered += any(isinstance(e, (ev.AnswerDelta, ev.ToolCallName)) for e in h.events)
    if engine.kv.pool.num_used:
        raise RuntimeError(f"{engine.kv.pool.num_used} KV pages still in use after every turn finished")
    return {"turns": n, "reasoning_tokens_mean": sum(reasoning) / n, "reasoning_tokens_max": max(reasoning),
            "reasoning_closed": closed / n, "closed_by_handoff": forced / n,
            "answer_or_call_after": answered / n,
            "finish_reasons": dict(collections.Counter(h.finish_reason for h in handles)),
            "routed": dict(collections.Counter(c.effort for c in convs)) if effort == "auto" else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?", default="checkpoints/kestrel-nano")
    parser.add_argument("--n", type=int, default=100, help="problems per suite and effort")
    parser.add_argument("--out", default="bench/results/effort_budgets_cpu.json")
    args = parser.parse_args(argv)
    model, tokenizer = load_checkpoint(args.ckpt)
    effort_model = EffortModel.load(args.ckpt)
    max_tokens = max(effort_model.budgets.values()) + ANSWER_ROOM
    result = {"benchmark": "effort_budgets", "checkpoint": args.ckpt, "budgets": dict(effort_model.budgets),
              "max_tokens": max_tokens, "n": args.n, "efforts": {}, "environment": environment()}
    for effort in EFFORTS:
        result["efforts"][effort] = {
            suite: first_turns(model, tokenizer, effort_model, effort, suite, args.n, max_tokens)
            for suite in ("stem", "tools")}
        print(effort, result["efforts"][effort], flush=True)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
