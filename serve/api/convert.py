"""CreateRequest (proto) -> the engine's request, with every check the API promises.

Every refusal is an ``ApiError`` whose message names the field at fault (``input[2].message.role
is not set``), raised before anything is queued. The HTTP gateway builds a ``CreateRequest`` from
OpenAI JSON and comes through here too, so both faces refuse the same things the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.errors import ApiError, invalid, not_found
from serve.api.records import RecordStore
from serve.grammar import FunctionTool, check_schema
from serve.request import SamplingParams
from serve.tools.schemas import CALCULATOR_TOOL, PYTHON_TOOL

import grpc

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CACHE_SALT = 256
MAX_METADATA = 16
MAX_STOP = 4

# The schemas kestrel-nano was trained with (a model offered other words reads another prompt).
BUILTIN_TOOLS: Mapping[str, FunctionTool] = {
    t["function"]["name"]: FunctionTool(t["function"]["name"], t["function"]["parameters"],
                                        t["function"]["description"])
    for t in (CALCULATOR_TOOL, PYTHON_TOOL)
}

EFFORTS = {pb.REASONING_EFFORT_UNSPECIFIED: "medium", pb.REASONING_EFFORT_NONE: "none",
           pb.REASONING_EFFORT_LOW: "low", pb.REASONING_EFFORT_MEDIUM: "medium",
           pb.REASONING_EFFORT_HIGH: "high", pb.REASONING_EFFORT_AUTO: "auto"}
SUMMARIES = {pb.REASONING_SUMMARY_UNSPECIFIED: "none", pb.REASONING_SUMMARY_NONE: "none",
             pb.REASONING_SUMMARY_AUTO: "auto", pb.REASONING_SUMMARY_CONCISE: "concise",
             pb.REASONING_SUMMARY_DETAILED: "detailed"}
# The formats the image decoder takes (model.image_processing.FORMATS); GIF: first frame.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
_ROLES = {pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant", pb.ROLE_SYSTEM: "system",
          pb.ROLE_DEVELOPER: "system"}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the server says about its model (ListModels) and the limits requests are held to."""

    id: str
    context_length: int
    max_output_tokens: int
    supports_reasoning: bool = True
    supports_tools: bool = True
    supports_images: bool = False

    def to_proto(self, is_default: bool = True) -> pb.Model:
        return pb.Model(id=self.id, is_default=is_default, context_length=self.context_length,
                        max_output_tokens=self.max_output_tokens,
                        supports_reasoning=self.supports_reasoning, supports_tools=self.supports_tools,
                        supports_images=self.supports_images)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Server settings that shape requests.

    Attributes:
      effort_budgets: reasoning tokens per effort, overriding the engine's table (the served
        checkpoint's calibrated ``effort.json``); None uses the engine's. ``auto`` is always the
        engine's: its predictor, or its medium budget when the model has none.
      python_timeout_s: default and upper bound of the python tool's wall-clock limit.
      max_tool_rounds: most built-in tool rounds in one response.
    """

    effort_budgets: Mapping[str, int] | None = None
    python_timeout_s: float = 10.0
    max_tool_rounds: int = 8


@dataclasses.dataclass
class Prepared:
    """A checked request, ready for the engine.

    Attributes:
      messages: the new OpenAI-style messages (instructions first).
      tools: function tools offered to the model (client functions and built-ins).
      builtins: built-in tool name -> its options (python: timeout seconds).
      tool_choice, parallel_tool_calls, response_format, effort, reasoning_budget: the channel spec.
      summary: "none" | "auto" | "concise" | "detailed".
      params: sampling parameters (``max_tokens`` is the response's whole output budget).
      stop: stop strings that end the answer.
      previous: the record of ``previous_response_id``, or None.
      store, metadata: as in the request.
      explicit_max_tokens: the client set ``max_output_tokens`` (then a prompt plus it beyond the
        context is an error, not a silent cut).
      speculative: False when the request opted out of speculative decoding.
      cache_salt: the request's cache salt, or None (the shared unsalted cache).
    """

    messages: list[dict[str, Any]]
    tools: tuple[FunctionTool, ...]
    builtins: dict[str, float | None]
    tool_choice: str
    parallel_tool_calls: bool
    response_format: dict[str, Any] | None
    effort: str
    reasoning_budget: int | None
    summary: str
    params: SamplingParams
    stop: tuple[str, ...]
    previous: Any
    store: bool
    metadata: dict[str, str]
    model: str
    explicit_max_tokens: bool = False
    speculative: bool = True
    cache_salt: str | None = None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid(f"{where} is not valid JSON: {e}") from None


def _messages(req: pb.CreateRequest, model: ModelInfo, previous) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if not req.input:
        raise invalid("input is empty: give at least one message")
    known_calls: set[str] = set(previous.pending_calls) if previous is not None else set()
    reasoning: str | None = None
    for i, item in enumerate(req.input):
        kind = item.WhichOneof("item")
        where = f"input[{i}]"
        if kind is None:
            raise invalid(f"{where} is empty: set message, function_call, function_call_output or reasoning")
        if kind == "message":
            m = item.message
            if m.role not in _ROLES:
                raise invalid(f"{where}.message.role is not set (user, assistant, system or developer)")
            if not m.content:
                raise invalid(f"{where}.message.content is empty")
            texts, parts = [], []
            role = _ROLES[m.role]
            for j, part in enumerate(m.content):
                which = part.WhichOneof("part")
                if which == "image":
                    if not model.supports_images:
                        raise invalid(f"{where}.message.content[{j}].image: model {model.id!r} does not take images")
                    if role != "user":
                        raise invalid(f"{where}.message.content[{j}].image: images are allowed in user messages only")
                    if not part.image.data:
                        raise invalid(f"{where}.message.content[{j}].image.data is empty")
                    if part.image.mime_type and part.image.mime_type not in IMAGE_TYPES:
                        raise invalid(f"{where}.message.content[{j}].image.mime_type {part.image.mime_type!r} "
                                      f"is not supported; supported: {', '.join(IMAGE_TYPES)}")
                    parts.append({"type": "image", "image": part.image.data})
                    continue
                if which is None:
                    raise invalid(f"{where}.message.content[{j}] is empty: set text or image")
                texts.append(part.text)
                parts.append({"type": "text", "text": part.text})
            text = "".join(texts)
            has_image = any(p["type"] == "image" for p in parts)
            if role != "assistant" and not text.strip() and not has_image:
                raise invalid(f"{where}.message has no text")
            msg: dict[str, Any] = {"role": role, "content": parts if has_image else text}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            out.append(msg)
        elif kind == "function_call":
            fc = item.function_call
            if not fc.call_id or not fc.name:
                raise invalid(f"{where}.function_call needs call_id and name")
            _json(fc.arguments or "{}", f"{where}.function_call.arguments")
            call = {"id": fc.call_id, "type": "function",
                    "function": {"name": fc.name, "arguments": fc.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and reasoning is None:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                out.append(msg)
            known_calls.add(fc.call_id)
        elif kind == "function_call_output":
            fo = item.function_call_output
            if fo.call_id not in known_calls:
                prev = f" or in previous response {previous.response.id!r}" if previous is not None else ""
                raise invalid(f"{where}.function_call_output.call_id {fo.call_id!r} matches no function "
                              f"call in the input{prev}")
            out.append({"role": "tool", "tool_call_id": fo.call_id, "content": fo.output})
        elif kind == "reasoning":
            reasoning = "".join(c.text for c in item.reasoning.content)
    if not any(m["role"] in ("user", "tool") for m in out) and previous is None:
        raise invalid("input has no user message")
    return out


def _tools(req: pb.CreateRequest, model: ModelInfo, policy: Policy) -> tuple[tuple[FunctionTool, ...], dict]:
    tools: list[FunctionTool] = []
    builtins: dict[str, float | None] = {}
    names: set[str] = set()
    for i, t in enumerate(req.tools):
        kind = t.WhichOneof("tool")
        where = f"tools[{i}]"
        if kind is None:
            raise invalid(f"{where} is empty: set function, calculator or python")
        if not model.supports_tools:
            raise invalid(f"{where}: model {model.id!r} does not call tools")
        if kind == "function":
            f = t.function
            if not _NAME.match(f.name):
                raise invalid(f"{where}.function.name {f.name!r} must match [A-Za-z0-9_-]{{1,64}}")
            params = _json(f.parameters, f"{where}.function.parameters") if f.parameters else \
                {"type": "object", "properties": {}}
            if not isinstance(params, dict):
                raise invalid(f"{where}.function.parameters must be a JSON object, got {type(params).__name__}")
            try:
                check_schema(params, where=f"{where}.function.parameters")
                tool = FunctionTool(f.name, params, f.description)
            except ValueError as e:
                raise invalid(str(e)) from None
        else:
            tool = BUILTIN_TOOLS[kind]
            timeout = None
            if kind == "python" and t.python.HasField("timeout_seconds"):
                timeout = t.python.timeout_seconds
                if not 0 < timeout <= policy.python_timeout_s:
                    raise invalid(f"{where}.python.timeout_seconds must be in (0, {policy.python_timeout_s}], "
                                  f"got {timeout}")
            builtins[kind] = timeout
        if tool.name in names:
            raise invalid(f"{where}: a tool named {tool.name!r} is already among the tools")
        names.add(tool.name)
        tools.append(tool)
    return tuple(tools), builtins


def _sampling(req: pb.CreateRequest, model: ModelInfo) -> tuple[SamplingParams, tuple[str, ...]]:
    max_tokens = model.max_output_tokens
    if req.HasField("max_output_tokens"):
        if not 1 <= req.max_output_tokens <= model.max_output_tokens:
            raise invalid(f"max_output_tokens must be in [1, {model.max_output_tokens}], "
                          f"got {req.max_output_tokens}")
        max_tokens = req.max_output_tokens
    s = req.sampling
    kw: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty", "presence_penalty",
                 "repetition_penalty"):
        if s.HasField(name):
            kw[name] = getattr(s, name)
    if s.top_logprobs and not s.logprobs:
        raise invalid("sampling.top_logprobs needs sampling.logprobs")
    if s.top_logprobs > 20:
        raise invalid(f"sampling.top_logprobs must be 0..20, got {s.top_logprobs}")
    if s.logprobs:
        kw["logprobs"], kw["top_logprobs"] = True, s.top_logprobs
    try:
        params = SamplingParams(**kw)
    except ValueError as e:
        raise invalid(f"sampling.{e}") from None
    if len(s.stop) > MAX_STOP:
        raise invalid(f"sampling.stop has {len(s.stop)} strings; at most {MAX_STOP} are allowed")
    if any(not x for x in s.stop):
        raise invalid("sampling.stop contains an empty string")
    return params, tuple(s.stop)


def prepare(req: pb.CreateRequest, *, model: ModelInfo, records: RecordStore, policy: Policy) -> Prepared:
    """Checks a CreateRequest and turns it into what the engine takes.

    Raises:
      ApiError: INVALID_ARGUMENT naming the field at fault; NOT_FOUND for an unknown model or
        ``previous_response_id``.
    """
    if req.model and req.model != model.id:
        raise not_found(f"model {req.model!r} is not served here; available: [{model.id!r}]")
    previous = None
    if req.previous_response_id:
        previous = records.get(req.previous_response_id)
        if previous is None or not previous.engine_ids:
            raise not_found(f"previous_response_id {req.previous_response_id!r} is unknown "
                            f"(never stored, deleted or evicted)")
        if not previous.done:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"previous_response_id {req.previous_response_id!r} is still running")
    messages = _messages(req, model, previous)
    tools, builtins = _tools(req, model, policy)
    names = [t.name for t in tools]
    tc = req.tool_choice
    choice = "auto"
    which = tc.WhichOneof("choice")
    if which == "function_name":
        if tc.function_name not in names:
            raise invalid(f"tool_choice.function_name {tc.function_name!r} is not among the tools {names}")
        choice = tc.function_name
    elif which == "mode":
        choice = {pb.ToolChoice.MODE_UNSPECIFIED: "auto", pb.ToolChoice.MODE_NONE: "none",
                  pb.ToolChoice.MODE_AUTO: "auto", pb.ToolChoice.MODE_REQUIRED: "required"}[tc.mode]
        if choice == "required" and not tools:
            raise invalid("tool_choice.mode REQUIRED needs at least one tool")
    response_format = None
    fmt = req.text.format
    if fmt.WhichOneof("format") == "json_schema":
        js = fmt.json_schema
        if js.name and not _NAME.match(js.name):
            raise invalid(f"text.format.json_schema.name {js.name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not js.schema:
            raise invalid("text.format.json_schema.schema is empty")
        schema = _json(js.schema, "text.format.json_schema.schema")
        try:
            check_schema(schema, where="text.format.json_schema.schema")
        except ValueError as e:
            raise invalid(str(e)) from None
        response_format = schema
    effort = EFFORTS.get(req.reasoning.effort)
    if effort is None:
        raise invalid(f"reasoning.effort {req.reasoning.effort} is not a known value")
    if not model.supports_reasoning:
        effort = "none"
    budget = None
    if req.reasoning.HasField("budget_tokens"):
        if effort == "none":
            raise invalid("reasoning.budget_tokens was given but reasoning.effort is NONE")
        if req.reasoning.budget_tokens < 1:
            raise invalid("reasoning.budget_tokens must be >= 1")
        budget = req.reasoning.budget_tokens
    elif effort not in ("none", "auto") and policy.effort_budgets is not None:
        budget = policy.effort_budgets.get(effort)
    summary = SUMMARIES.get(req.reasoning.summary, "none")
    params, stop = _sampling(req, model)
    if len(req.metadata) > MAX_METADATA:
        raise invalid(f"metadata has {len(req.metadata)} keys; at most {MAX_METADATA} are allowed")
    for k, v in req.metadata.items():
        if len(k) > 64 or len(v) > 512:
            raise invalid(f"metadata[{k[:64]!r}]: keys are at most 64 characters, values at most 512")
    if len(req.cache_salt) > MAX_CACHE_SALT:
        raise invalid(f"cache_salt has {len(req.cache_salt)} characters; at most {MAX_CACHE_SALT} "
                      "are allowed")
    return Prepared(messages=messages, tools=tools, builtins=builtins, tool_choice=choice,
                    parallel_tool_calls=req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True,
                    response_format=response_format, effort=effort, reasoning_budget=budget,
                    summary=summary, params=params, stop=stop, previous=previous,
                    store=req.store if req.HasField("store") else True, metadata=dict(req.metadata),
                    model=model.id, explicit_max_tokens=req.HasField("max_output_tokens"),
                    speculative=req.sampling.speculative if req.sampling.HasField("speculative") else True,
                    cache_salt=req.cache_salt or None)
