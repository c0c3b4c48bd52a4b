"""Reasoning summaries written by the served model itself.

A summary is a second engine request: the response's reasoning so far as the user turn of a short
conversation with a summarisation system prompt, answered greedily without thinking (the chat
template's ``enable_thinking=False`` form, Qwen3's empty ``<think>`` block, and ``effort="none"``
so the channel machine never opens one). kestrel-nano learns exactly these conversations from
``train/synthetic/summaries.py``; any other chat model follows the instruction as it can.

The levels differ in how many tokens the summary may take: ``concise`` one short line,
``auto`` a line, ``detailed`` a few lines.
"""

from __future__ import annotations

from serve.request import SamplingParams

SUMMARY_SYSTEM_PROMPT = "You summarize reasoning. Reply with one line that states the method and the result."
SUMMARY_REQUEST = "Summarize this reasoning:\n"
SUMMARY_LEVELS = ("concise", "auto", "detailed")
SUMMARY_MAX_TOKENS = {"concise": 48, "auto": 96, "detailed": 192}


def summary_messages(reasoning: str) -> list[dict]:
    """The conversation a summary pass sends the model for `reasoning`."""
    return [{"role": "system", "content": SUMMARY_SYSTEM_PROMPT},
            {"role": "user", "content": SUMMARY_REQUEST + reasoning.strip()}]


def summary_request_fields(reasoning: str, level: str) -> dict:
    """The ``EngineRequest`` fields of a summary pass (greedy, no thinking, no tools, not stored).

    Raises:
      ValueError: `level` is not one of `SUMMARY_LEVELS`.
    """
    if level not in SUMMARY_LEVELS:
        raise ValueError(f"summary must be one of {SUMMARY_LEVELS}, got {level!r}")
    return {"messages": summary_messages(reasoning), "tool_choice": "none", "effort": "none",
            "params": SamplingParams(max_tokens=SUMMARY_MAX_TOKENS[level], temperature=0.0),
            "store": False, "chat_kwargs": {"enable_thinking": False}}
