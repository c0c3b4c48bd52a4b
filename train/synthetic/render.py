"""Renders an `Example` in Kestrel's chat format as (text, trainable) segments.

The text is exactly what ``model.chat_template.KESTREL_TEMPLATE`` (Qwen3's template, minus its
parsing of ``<think>`` out of ``content``) renders for the same messages and tools (ChatML
turns; tools as JSON lines inside ``<tools>`` in the system turn; reasoning in ``<think>``; calls
in ``<tool_call>``; tool results as a user turn of ``<tool_response>`` blocks). Like Qwen3's
template, assistant turns before the last user message lose their reasoning: that is how a
conversation looks when it is continued at inference time.

Trainable text is what the model produces in the final exchange: each assistant message after the
last user message, from its first token after ``<|im_start|>assistant\\n`` through its closing
``<|im_end|>``. System, user and tool text is never trainable, nor is the role header (the
generation prompt supplies it) nor the newline after ``<|im_end|>``. Earlier assistant turns are
context (their reasoning is dropped, so they are not what the model would write), trainable only
with ``train_history=True``.
"""

import json
from typing import Any

from train.synthetic.example import Example

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


def to_json(value: Any) -> str:
    """JSON as the chat template writes it (transformers' ``tojson``: no key sorting, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def _last_query_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and isinstance(messages[i].get("content"), str):
            return i
    return len(messages) - 1


def _assistant_body(m: dict, with_reasoning: bool) -> str:
    content = m.get("content") or ""
    reasoning = m.get("reasoning_content")
    reasoning = reasoning if isinstance(reasoning, str) else ""
    if with_reasoning:
        text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    else:
        text = content
    for k, tc in enumerate(m.get("tool_calls") or []):
        if (k == 0 and content) or k > 0:
            text += "\n"
        fn = tc.get("function", tc)
        args = fn["arguments"]
        text += '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": '
        text += (args if isinstance(args, str) else to_json(args)) + "}\n</tool_call>"
    return text


def render_segments(messages: list[dict], tools: list[dict] | None = None, *,
                    train_history: bool = False) -> list[tuple[str, bool]]:
    """Renders `messages` (+ `tools`) as (text, trainable) segments; see the module docstring."""
    segs: list[tuple[str, bool]] = []

    def emit(text: str, trainable: bool) -> None:
        if not text:
            return
        if segs and segs[-1][1] == trainable:
            segs[-1] = (segs[-1][0] + text, trainable)
        else:
            segs.append((text, trainable))

    first_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        head = "<|im_start|>system\n" + (messages[0]["content"] + "\n\n" if first_system else "")
        head += TOOLS_PREAMBLE + "".join("\n" + to_json(t) for t in tools) + TOOLS_POSTAMBLE + "<|im_end|>\n"
        emit(head, False)
    elif first_system:
        emit("<|im_start|>system\n" + messages[0]["content"] + "<|im_end|>\n", False)
    last_query = _last_query_index(messages)
    for i, m in enumerate(messages):
        role = m["role"]
        content = m.get("content") if isinstance(m.get("content"), str) else ""
        if role == "user" or (role == "system" and i > 0):
            emit(f"<|im_start|>{role}\n{content}<|im_end|>\n", False)
        elif role == "assistant":
            final = i > last_query
            with_reasoning = final and (i == len(messages) - 1 or bool(m.get("reasoning_content")))
            emit("<|im_start|>assistant\n", False)
            emit(_assistant_body(m, with_reasoning) + "<|im_end|>", final or train_history)
            emit("\n", False)
        elif role == "tool":
            text = ""
            if i == 0 or messages[i - 1]["role"] != "tool":
                text += "<|im_start|>user"
            text += "\n<tool_response>\n" + content + "\n</tool_response>"
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                text += "<|im_end|>\n"
            emit(text, False)
        elif role != "system":
            raise ValueError(f"message {i} has unknown role {role!r}")
    return segs


def render_kestrel(example: Example, *, train_history: bool = False) -> list[tuple[str, bool]]:
    """The example as Kestrel chat text, in (text, trainable) segments whose concatenation is the
    chat template's rendering; trainable exactly for the final exchange's assistant output."""
    return render_segments(example.messages, example.tools, train_history=train_history)


def render_session(examples: list[Example]) -> list[tuple[str, bool]]:
    """Several problems asked one after another in one conversation, every turn's reasoning kept.

    The first example is rendered whole (system prompt, tools header, its exchange); each later
    one adds its user turn and its exchange, as a follow-up turn continues a stored conversation
    in the engine (``previous_response_id`` keeps the earlier turns' tokens, reasoning included,
    rather than re-rendering them). Every exchange is trainable. The examples must offer the same
    tools: the header is written once.

    Raises:
      ValueError: no examples, or examples offering different tools.
    """
    if not examples:
        raise ValueError("a session needs at least one example")
    if any(ex.tools != examples[0].tools for ex in examples[1:]):
        raise ValueError("the examples of a session must offer the same tools")
    segs = list(render_kestrel(examples[0]))
    for ex in examples[1:]:
        for text, trainable in render_segments(ex.messages[1:] if ex.messages[0]["role"] == "system"
                                               else ex.messages):
            if segs and segs[-1][1] == trainable:
                segs[-1] = (segs[-1][0] + text, trainable)
            else:
                segs.append((text, trainable))
    return segs
