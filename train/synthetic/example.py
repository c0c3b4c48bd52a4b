"""The `Example` record every synthetic task produces, and the two built-in tool schemas.

An example is an OpenAI-style conversation (``messages``), the tools offered to the model
(``tools``) and ``meta``: the task, its difficulty level 1..5, the canonical final answer, a one-line
summary of the reasoning, the split ("train" or "heldout") and, for function calling, the calls
the final turn is expected to make. Assistant reasoning lives in ``reasoning_content``; tool calls
carry their arguments as dicts (not JSON strings) so renderers and checkers need not re-parse them.
A problem shown as a picture adds ``images`` (PNG bytes); each one stands at an ``<image>``
placeholder in the user's text (DESIGN.md's chat format), in order.
"""

import dataclasses
from typing import Any

from model.chat_template import effort_line
from serve.tools.schemas import CALCULATOR_TOOL, PYTHON_TOOL

BUILTIN_TOOLS = (CALCULATOR_TOOL, PYTHON_TOOL)

SYSTEM_PROMPT = "You are Kestrel, a careful assistant. Think step by step and use tools when they help."

SPLITS = ("train", "heldout")

# Where an image goes in a message's text (one token of every Kestrel vocabulary).
IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class Example:
    """One synthetic conversation.

    Attributes:
      messages: OpenAI-style dicts: ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``;
        assistant messages may add ``reasoning_content`` (str) and ``tool_calls``
        (``[{"type": "function", "id": str, "function": {"name": str, "arguments": dict}}]``);
        tool messages add ``tool_call_id``.
      tools: the functions offered, ``[{"type": "function", "function": {"name", "description",
        "parameters"}}]``.
      meta: ``task``, ``level`` (1..5), ``answer`` (canonical final answer), ``summary`` (one line),
        ``split``, ``tools`` (whether tools were offered), ``answer_kind`` ("number", "equation",
        "results" or "refusal"), ``tolerance`` (relative, for numbers), ``prompt_len`` (how many
        messages form the prompt of the final turn, i.e. the index of its first assistant message)
        and, for function calling, ``calls``: the expected calls of the final turn as
        ``[{"name": str, "arguments": dict}]`` (``[]`` when no call is expected).
      images: PNG bytes, one per ``IMAGE_PLACEHOLDER`` in the user messages, in order of
        appearance; empty for text-only examples.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    meta: dict[str, Any]
    images: list[bytes] = dataclasses.field(default_factory=list)

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The messages the model sees before producing its final turn."""
        return self.messages[: self.meta["prompt_len"]]


def with_effort_hint(example: Example, effort: str | None) -> Example:
    """`example` as asked at reasoning `effort`: its system message ends with the sentence the
    chat template writes for ``reasoning_effort`` (``model.chat_template.effort_line``), a system
    message being opened for it if there is none. None leaves the example as it is."""
    if effort is None:
        return example
    line = effort_line(effort)
    messages = [dict(m) for m in example.messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = (messages[0]["content"] + "\n" if messages[0]["content"] else "") + line
        prompt_len = example.meta["prompt_len"]
    else:
        messages.insert(0, {"role": "system", "content": line})
        prompt_len = example.meta["prompt_len"] + 1
    return dataclasses.replace(example, messages=messages,
                               meta={**example.meta, "effort": effort, "prompt_len": prompt_len})


def tool_call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    """An assistant tool call in the OpenAI shape, arguments kept as a dict."""
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}
