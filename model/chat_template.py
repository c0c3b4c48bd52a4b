"""Chat templates: a checkpoint's own Jinja template, rendered as transformers renders it.

The environment matches transformers' ``apply_chat_template`` (sandboxed, ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, ``raise_exception``, ``strftime_now`` and a
``tojson`` that does not escape HTML), so a converted checkpoint renders prompts exactly as its
authors intended. ``KESTREL_TEMPLATE`` is the default for Kestrel's own models.

    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    prompt = template.render([{"role": "user", "content": "hi"}], tools=[...])
"""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.sandbox

from kestrel.errors import KestrelError

# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A ``namespace()`` that refuses underscore names, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 -- same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Copies template inputs into plain JSON types, so the template sees no live Python objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    raise ValueError(f"chat template inputs must be JSON-like; got {type(value).__name__}")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A compiled chat template.

    Args:
      source: the Jinja text (from ``tokenizer_config.json``, ``chat_template.jinja`` or GGUF metadata).
      bos_token, eos_token, pad_token, unk_token: exposed to the template under those names, as
        transformers does (templates write e.g. ``{{ bos_token }}``).
      name: what the error messages call this template.

    Raises:
      KestrelError: the text is not valid Jinja.
    """

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, name: str = "chat template"):
        if not isinstance(source, str):
            raise KestrelError(f"{name} must be a string, got {type(source).__name__}")
        self.source = source
        self.name = name
        self.special_tokens = {k: v for k, v in
                               (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                                ("unk_token", unk_token)) if v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise KestrelError(f"invalid {name}: line {e.lineno}: {e.message}") from e

    @functools.cached_property
    def shows_tools(self) -> bool:
        """Whether the template writes the offered functions into the prompt.

        Some templates (SmolLM2-135M-Instruct's, for one) ignore ``tools``: a model served with
        them would never see the functions it is offered. Checked once, by rendering a probe
        function; a template that fails on the probe counts as showing tools, so that the real
        render reports its own error.
        """
        probe = [{"type": "function", "function": {"name": "kestrel_probe_function", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            text = self.render([{"role": "user", "content": "hi"}], tools=probe)
        except (KestrelError, ValueError):
            return True
        return "kestrel_probe_function" in text

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Renders a conversation to the prompt text.

        Args:
          messages: OpenAI-style dicts: ``role``, ``content``, optional ``reasoning_content``,
            ``tool_calls`` (``[{type: function, function: {name, arguments}}]``); tool results
            have role ``tool``.
          tools: JSON schemas of the tools (``{type: function, function: {name, description, parameters}}``).
          add_generation_prompt: end with the assistant turn's opening.
          **kwargs: more template variables (e.g. ``enable_thinking=False``); they override the
            special tokens of the same name.

        Raises:
          KestrelError: the template rejects the conversation (``raise_exception``) or fails.
        """
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("messages must be a list of dicts with 'role' and 'content'")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        chat = [_alias_reasoning(m) for m in _plain(list(messages))]
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(
                messages=chat, tools=_plain(tools), documents=None, add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise KestrelError(f"{self.name} failed: {e}") from e


# Kestrel's own template: ChatML roles with Qwen3-style tags, so that kestrel-nano and converted
# Qwen3 checkpoints produce the same token grammar for the serving channel machine. Reasoning goes
# in <think>...</think> (kept for turns after the last user query, as Qwen3 does), tool calls as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, tool results inside
# <tool_response> in a user turn, and tools listed in the system turn as JSON schemas.
# ``reasoning_effort`` (low, medium, high or auto), when given, ends the system turn with
# `effort_line`'s sentence (a system turn is opened for it if the conversation has none): the
# "template hint" through which vLLM and SGLang pass an effort to models trained to heed one.
KESTREL_TEMPLATE = """\
{%- set has_system = messages and messages[0].role == 'system' %}
{%- set system = messages[0].content if has_system else '' %}
{%- if reasoning_effort is defined and reasoning_effort %}
    {%- set system = (system + '\\n' if system else '') + 'Reasoning effort: ' + reasoning_effort + '.' %}
    {%- set has_system = true %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if has_system %}
        {{- system + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif has_system %}
    {{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' \
+ content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}
                {{- call.arguments }}
            {%- else %}
                {{- call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def effort_line(effort: str) -> str:
    """The sentence ``KESTREL_TEMPLATE`` ends the system turn with for ``reasoning_effort``; the
    training data writes the same sentence, so prompts rendered either way are the same text."""
    return f"Reasoning effort: {effort}."
