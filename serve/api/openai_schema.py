"""OpenAI JSON <-> Kestrel protos: Chat Completions and Responses requests in, their objects out.

Requests become a ``CreateRequest`` and go through the same checks as gRPC calls
(``serve.api.convert.prepare``); shapes that only OpenAI JSON can get wrong (a message that is not
an object, ``n`` other than 1) are refused here with the JSON path in the message.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.errors import invalid

CHAT_EFFORTS = {"none": pb.REASONING_EFFORT_NONE, "minimal": pb.REASONING_EFFORT_LOW,
                "low": pb.REASONING_EFFORT_LOW, "medium": pb.REASONING_EFFORT_MEDIUM,
                "high": pb.REASONING_EFFORT_HIGH, "auto": pb.REASONING_EFFORT_AUTO}
SUMMARIES = {"auto": pb.REASONING_SUMMARY_AUTO, "concise": pb.REASONING_SUMMARY_CONCISE,
             "detailed": pb.REASONING_SUMMARY_DETAILED, "none": pb.REASONING_SUMMARY_NONE}
_ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "system": pb.ROLE_SYSTEM,
          "developer": pb.ROLE_DEVELOPER}


def _obj(x: Any, where: str) -> dict:
    if not isinstance(x, dict):
        raise invalid(f"{where} must be an object, got {type(x).__name__}")
    return x


def _text_parts(content: Any, where: str) -> list[pb.InputContent]:
    if content is None:
        return []
    if isinstance(content, str):
        return [pb.InputContent(text=content)]
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        part = _obj(part, f"{where}[{j}]")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            parts.append(pb.InputContent(text=str(part.get("text", ""))))
        elif kind in ("image_url", "input_image"):
            parts.append(pb.InputContent(image=_image(part, f"{where}[{j}]")))
        else:
            raise invalid(f"{where}[{j}].type {kind!r} is not supported")
    return parts


def _image(part: dict, where: str) -> pb.InputImage:
    """An ``image_url`` (Chat Completions: ``{"url": ...}`` or a string) or ``input_image``
    (Responses: ``image_url`` string) part as an inline image; only ``data:`` URLs are taken."""
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if part.get("file_id") and url is None:
        raise invalid(f"{where}.file_id: uploaded files are not supported; send a data: URL")
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url must hold a url")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise invalid(f"{where}.image_url: {scheme!r} URLs are not fetched (the server has no network "
                      "access); send the image inline as a data: URL (data:image/png;base64,...)")
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise invalid(f"{where}.image_url: a data URL must be base64 (data:<mime>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}.image_url: the data URL's base64 payload is invalid") from None
    return pb.InputImage(data=data, mime_type=header[: -len(";base64")])


def _schema_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON schema object")
    return json.dumps(value)


def _tool(t: Any, where: str, *, chat: bool) -> pb.Tool:
    t = _obj(t, where)
    kind = t.get("type", "function")
    if kind == "calculator":
        return pb.Tool(calculator=pb.CalculatorTool())
    if kind == "python":
        tool = pb.Tool(python=pb.PythonTool())
        if "timeout_seconds" in t:
            tool.python.timeout_seconds = float(t["timeout_seconds"])
        return tool
    if kind != "function":
        raise invalid(f"{where}.type {kind!r} is not supported (function, calculator, python)")
    fn = _obj(t.get("function"), f"{where}.function") if chat else t
    return pb.Tool(function=pb.FunctionTool(
        name=str(fn.get("name", "")), description=str(fn.get("description") or ""),
        parameters=_schema_text(fn.get("parameters"), f"{where}.parameters"), strict=bool(fn.get("strict"))))


def _tool_choice(choice: Any, where: str) -> pb.ToolChoice:
    if choice is None:
        return pb.ToolChoice()
    if isinstance(choice, str):
        modes = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO,
                 "required": pb.ToolChoice.MODE_REQUIRED}
        if choice not in modes:
            raise invalid(f"{where} must be 'none', 'auto', 'required' or a function, got {choice!r}")
        return pb.ToolChoice(mode=modes[choice])
    choice = _obj(choice, where)
    fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
    return pb.ToolChoice(function_name=str(fn.get("name", "")))


def _cache_salt(body: dict, req: pb.CreateRequest) -> None:
    """vLLM's ``cache_salt`` body field (both APIs): a string, or absent / null."""
    salt = body.get("cache_salt")
    if salt is not None:
        if not isinstance(salt, str) or not salt:
            raise invalid(f"cache_salt must be a non-empty string, got {salt!r}")
        req.cache_salt = salt


def _sampling(body: dict, req: pb.CreateRequest) -> None:
    s = req.sampling
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "min_p", "repetition_penalty"):
        if body.get(name) is not None:
            setattr(s, name, float(body[name]))
    if body.get("top_k") is not None:
        s.top_k = int(body["top_k"])
    if body.get("seed") is not None:
        s.seed = int(body["seed"])
    if body.get("logprobs"):
        s.logprobs = True
    if body.get("speculative") is not None:
        if not isinstance(body["speculative"], bool):
            raise invalid(f"speculative must be true or false, got {body['speculative']!r}")
        s.speculative = body["speculative"]
    top = body.get("top_logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise invalid(f"top_logprobs must be an integer 0..20, got {top!r}")
        s.top_logprobs = top  # without logprobs: refused by prepare()
    stop = body.get("stop")
    if stop is not None:
        s.stop.extend([stop] if isinstance(stop, str) else list(stop))


def chat_request(body: dict) -> tuple[pb.CreateRequest, bool, bool]:
    """A Chat Completions body -> (CreateRequest, stream, include_usage)."""
    body = _obj(body, "body")
    req = pb.CreateRequest(model=str(body.get("model") or ""), store=False)
    if body.get("n", 1) != 1:
        raise invalid("n must be 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list")
    for i, m in enumerate(messages):
        m = _obj(m, f"messages[{i}]")
        role = m.get("role")
        if role == "tool":
            req.input.add(function_call_output=pb.FunctionCallOutput(
                call_id=str(m.get("tool_call_id", "")), output=_plain(m.get("content"))))
            continue
        if role not in _ROLES:
            raise invalid(f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, tool")
        if role == "assistant" and m.get("reasoning_content"):
            req.input.add(reasoning=pb.ReasoningItem(content=[pb.ReasoningText(text=str(m["reasoning_content"]))]))
        parts = _text_parts(m.get("content"), f"messages[{i}].content")
        if parts or role != "assistant":
            req.input.add(message=pb.InputMessage(role=_ROLES[role], content=parts))
        for j, call in enumerate(m.get("tool_calls") or []):
            call = _obj(call, f"messages[{i}].tool_calls[{j}]")
            fn = _obj(call.get("function"), f"messages[{i}].tool_calls[{j}].function")
            args = fn.get("arguments", "{}")
            req.input.add(function_call=pb.FunctionCall(
                call_id=str(call.get("id", "")), name=str(fn.get("name", "")),
                arguments=args if isinstance(args, str) else json.dumps(args)))
    for i, t in enumerate(body.get("tools") or []):
        req.tools.append(_tool(t, f"tools[{i}]", chat=True))
    req.tool_choice.CopyFrom(_tool_choice(body.get("tool_choice"), "tool_choice"))
    if body.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = bool(body["parallel_tool_calls"])
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in CHAT_EFFORTS:
            raise invalid(f"reasoning_effort must be one of {sorted(CHAT_EFFORTS)}, got {effort!r}")
        req.reasoning.effort = CHAT_EFFORTS[effort]
    fmt = body.get("response_format")
    if fmt is not None:
        fmt = _obj(fmt, "response_format")
        if fmt.get("type") == "json_schema":
            js = _obj(fmt.get("json_schema"), "response_format.json_schema")
            req.text.format.json_schema.CopyFrom(pb.JsonSchemaFormat(
                name=str(js.get("name", "")), description=str(js.get("description") or ""),
                schema=_schema_text(js.get("schema"), "response_format.json_schema.schema"),
                strict=bool(js.get("strict"))))
        elif fmt.get("type") == "json_object":
            req.text.format.json_schema.CopyFrom(pb.JsonSchemaFormat(name="json_object", schema='{"type": "object"}'))
        elif fmt.get("type") != "text":
            raise invalid(f"response_format.type must be text, json_object or json_schema, got {fmt.get('type')!r}")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise invalid(f"max_completion_tokens must be an integer >= 1, got {limit!r}")
        req.max_output_tokens = limit
    _sampling(body, req)
    _cache_salt(body, req)
    opts = body.get("stream_options") or {}
    return req, bool(body.get("stream")), bool(_obj(opts, "stream_options").get("include_usage"))


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def responses_request(body: dict) -> tuple[pb.CreateRequest, bool]:
    """A Responses API body -> (CreateRequest, stream)."""
    body = _obj(body, "body")
    req = pb.CreateRequest(model=str(body.get("model") or ""), instructions=str(body.get("instructions") or ""),
                           previous_response_id=str(body.get("previous_response_id") or ""))
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise invalid("input must be a string or a list of items")
    for i, item in enumerate(items):
        item = _obj(item, f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(f"input[{i}].role {role!r} is not one of user, assistant, system, developer")
            req.input.add(message=pb.InputMessage(role=_ROLES[role],
                                                  content=_text_parts(item.get("content"), f"input[{i}].content")))
        elif kind == "function_call":
            args = item.get("arguments", "{}")
            req.input.add(function_call=pb.FunctionCall(call_id=str(item.get("call_id", "")),
                                                        name=str(item.get("name", "")),
                                                        arguments=args if isinstance(args, str) else json.dumps(args)))
        elif kind == "function_call_output":
            out = item.get("output", "")
            req.input.add(function_call_output=pb.FunctionCallOutput(
                call_id=str(item.get("call_id", "")), output=out if isinstance(out, str) else json.dumps(out)))
        elif kind == "reasoning":
            text = "".join(str(c.get("text", "")) for c in item.get("content") or [] if isinstance(c, dict))
            req.input.add(reasoning=pb.ReasoningItem(content=[pb.ReasoningText(text=text)]))
        else:
            raise invalid(f"input[{i}].type {kind!r} is not supported")
    for i, t in enumerate(body.get("tools") or []):
        req.tools.append(_tool(t, f"tools[{i}]", chat=False))
    req.tool_choice.CopyFrom(_tool_choice(body.get("tool_choice"), "tool_choice"))
    if body.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = bool(body["parallel_tool_calls"])
    reasoning = body.get("reasoning") or {}
    reasoning = _obj(reasoning, "reasoning")
    if reasoning.get("effort") is not None:
        if reasoning["effort"] not in CHAT_EFFORTS:
            raise invalid(f"reasoning.effort must be one of {sorted(CHAT_EFFORTS)}, got {reasoning['effort']!r}")
        req.reasoning.effort = CHAT_EFFORTS[reasoning["effort"]]
    if reasoning.get("summary") is not None:
        if reasoning["summary"] not in SUMMARIES:
            raise invalid(f"reasoning.summary must be one of {sorted(SUMMARIES)}, got {reasoning['summary']!r}")
        req.reasoning.summary = SUMMARIES[reasoning["summary"]]
    fmt = ((body.get("text") or {}).get("format")) if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        fmt = _obj(fmt, "text.format")
        if fmt.get("type") == "json_schema":
            req.text.format.json_schema.CopyFrom(pb.JsonSchemaFormat(
                name=str(fmt.get("name", "")), description=str(fmt.get("description") or ""),
                schema=_schema_text(fmt.get("schema"), "text.format.schema"), strict=bool(fmt.get("strict"))))
    if body.get("max_output_tokens") is not None:
        req.max_output_tokens = int(body["max_output_tokens"])
    if body.get("store") is not None:
        req.store = bool(body["store"])
    for k, v in (body.get("metadata") or {}).items():
        req.metadata[str(k)] = str(v)
    _sampling(body, req)
    _cache_salt(body, req)
    return req, bool(body.get("stream"))


# ------------------------------------------------------------------------ objects out

_STATUS = {pb.RESPONSE_STATUS_QUEUED: "queued", pb.RESPONSE_STATUS_IN_PROGRESS: "in_progress",
           pb.RESPONSE_STATUS_COMPLETED: "completed", pb.RESPONSE_STATUS_INCOMPLETE: "incomplete",
           pb.RESPONSE_STATUS_FAILED: "failed", pb.RESPONSE_STATUS_CANCELLED: "cancelled"}
_ITEM_STATUS = {pb.ITEM_STATUS_IN_PROGRESS: "in_progress", pb.ITEM_STATUS_COMPLETED: "completed",
                pb.ITEM_STATUS_INCOMPLETE: "incomplete", pb.ITEM_STATUS_UNSPECIFIED: "in_progress"}
_INCOMPLETE = {pb.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS: "max_output_tokens",
               pb.INCOMPLETE_REASON_CANCELLED: "cancelled", pb.INCOMPLETE_REASON_DEADLINE_EXCEEDED: "deadline_exceeded",
               pb.INCOMPLETE_REASON_MAX_TOOL_ROUNDS: "max_tool_rounds"}


def _predictions(u: pb.Usage) -> dict:
    """Speculative drafts, named as OpenAI names Predicted Outputs' counts."""
    return {"accepted_prediction_tokens": u.accepted_prediction_tokens,
            "rejected_prediction_tokens": u.rejected_prediction_tokens}


def usage_json(u: pb.Usage) -> dict:
    return {"input_tokens": u.input_tokens, "input_tokens_details": {"cached_tokens": u.cached_input_tokens,
                                                                     "image_tokens": u.image_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens, **_predictions(u)},
            "total_tokens": u.total_tokens}


def chat_usage_json(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens, "image_tokens": u.image_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, **_predictions(u)}}


def logprob_json(r: pb.TokenLogprob) -> dict:
    """A TokenLogprob in OpenAI's form (Chat Completions and Responses) (bytes as a list of ints)."""
    return {"token": r.token, "logprob": r.logprob, "bytes": list(r.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                             for t in r.top_logprobs]}


def item_json(item: pb.OutputItem) -> dict:
    status = _ITEM_STATUS[item.status]
    kind = item.WhichOneof("item")
    if kind == "reasoning":
        r = item.reasoning
        return {"type": "reasoning", "id": item.id, "status": status,
                "summary": [{"type": "summary_text", "text": s.text} for s in r.summary],
                "content": [{"type": "reasoning_text", "text": c.text} for c in r.content]}
    if kind == "message":
        return {"type": "message", "id": item.id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": c.text, "annotations": [],
                             "logprobs": [logprob_json(r) for r in c.logprobs]}
                            for c in item.message.content]}
    if kind == "function_call":
        f = item.function_call
        return {"type": "function_call", "id": item.id, "call_id": f.call_id, "name": f.name,
                "arguments": f.arguments, "status": status}
    b = item.builtin_tool_call
    return {"type": "builtin_tool_call", "id": item.id, "call_id": b.call_id, "name": b.name,
            "arguments": b.arguments, "output": b.output, "is_error": b.is_error, "status": status}


def reasoning_json(r: pb.Reasoning) -> dict:
    """The Responses API's ``reasoning`` object: the served effort (auto's routed choice) and summary."""
    effort = pb.ReasoningEffort.Name(r.effort).removeprefix("REASONING_EFFORT_").lower()
    summary = pb.ReasoningSummary.Name(r.summary).removeprefix("REASONING_SUMMARY_").lower()
    out = {"effort": None if effort == "unspecified" else effort,
           "summary": None if summary in ("none", "unspecified") else summary}
    if r.HasField("budget_tokens"):
        out["budget_tokens"] = r.budget_tokens
    return out


def response_json(r: pb.Response) -> dict:
    out = {"id": r.id, "object": "response", "created_at": r.created_at.seconds, "model": r.model,
           "status": _STATUS.get(r.status, "in_progress"), "output": [item_json(i) for i in r.output],
           "usage": usage_json(r.usage) if r.HasField("usage") else None,
           "incomplete_details": ({"reason": _INCOMPLETE.get(r.incomplete_details.reason, "unknown")}
                                  if r.HasField("incomplete_details") else None),
           "error": {"code": r.error.code, "message": r.error.message} if r.HasField("error") else None,
           "previous_response_id": r.previous_response_id or None, "metadata": dict(r.metadata),
           "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
           "reasoning": reasoning_json(r.reasoning)}
    if r.HasField("completed_at"):
        out["completed_at"] = r.completed_at.seconds
    return out
