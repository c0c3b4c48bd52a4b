"""Reasoning summaries: the task that teaches a model to summarise its own reasoning.

The API's reasoning summaries are a second pass of the served model over a response's reasoning
(``serve/summaries.py``): a conversation of `summary_messages` (a system prompt, the reasoning
as the user turn) answered without thinking (Qwen3's empty ``<think>\\n\\n</think>`` block). This
task makes exactly those conversations from STEM examples, so the model that reasons also learns
to summarise:

- the whole final exchange's reasoning (every round, tool results included as the reasoning
  quotes them) -> the example's one-line summary (``meta["summary"]``);
- with probability `PARTIAL_SHARE`, only the reasoning before the first tool call (what a
  streamed response has when its first reasoning item closes) -> a line naming the plan, since
  the result is not known yet.
"""

from __future__ import annotations

import random

from serve.summaries import summary_messages
from train.synthetic.example import Example

PARTIAL_SHARE = 0.25


def partial_summary(first_reasoning: str) -> str:
    """The target for reasoning cut at its first tool call: the plan, result pending."""
    plan = next((line[len("Plan: "):].rstrip(".") for line in first_reasoning.splitlines()
                 if line.startswith("Plan: ")), "")
    tool = "python" if "Use python." in first_reasoning else "the calculator"
    return (f"Planned: {plan}; asked {tool} for the first step." if plan
            else f"Asked {tool} for the first step.")


def make_summary(rng: random.Random, level: int, split: str) -> Example:
    """A summary conversation over a freshly generated STEM example's reasoning."""
    from train.synthetic.registry import SUITES, generate  # the registry imports this module

    task = rng.choice(SUITES["stem"])
    source = generate(task, level=level, rng=rng, split=split, tools=rng.random() < 0.8)
    final = source.messages[source.meta["prompt_len"]:]
    rounds = [m["reasoning_content"] for m in final if m["role"] == "assistant" and m.get("reasoning_content")]
    calls = any(m.get("tool_calls") for m in final)
    if calls and rng.random() < PARTIAL_SHARE:
        reasoning, summary = rounds[0], partial_summary(rounds[0])
    else:
        reasoning, summary = "\n".join(rounds), source.meta["summary"]
    messages = summary_messages(reasoning) + [
        {"role": "assistant", "content": summary, "reasoning_content": ""}]
    meta = {"task": "summarize", "level": level, "answer": summary, "summary": summary,
            "split": split, "tools": False, "answer_kind": "summary", "tolerance": 0.0,
            "prompt_len": 2, "source_task": task}
    return Example(messages=messages, tools=[], meta=meta)
