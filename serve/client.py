"""A Python client for Kestrel's gRPC API, with an async face (``AsyncClient``) and a sync one
(``Client``).

    with Client("127.0.0.1:50051") as client:
        for event in client.stream("What is 2**10?", tools=[calculator()]):
            ...
        response = client.create("Hello")          # the finished Response proto

Local Python functions become tools with ``function_tool(fn)`` (the schema comes from the type
hints); ``run_with_functions`` answers the model's calls by running them and continuing the
conversation until the response ends without a call.
"""

from __future__ import annotations

import inspect
import json
import mimetypes
import typing
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Sequence

import grpc

from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc

EFFORTS = {"none": pb.REASONING_EFFORT_NONE, "low": pb.REASONING_EFFORT_LOW, "medium": pb.REASONING_EFFORT_MEDIUM,
           "high": pb.REASONING_EFFORT_HIGH, "auto": pb.REASONING_EFFORT_AUTO}
SUMMARIES = {"none": pb.REASONING_SUMMARY_NONE, "auto": pb.REASONING_SUMMARY_AUTO,
             "concise": pb.REASONING_SUMMARY_CONCISE, "detailed": pb.REASONING_SUMMARY_DETAILED}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def calculator() -> pb.Tool:
    """The built-in calculator tool (run by the server)."""
    return pb.Tool(calculator=pb.CalculatorTool())


def python_tool(timeout_s: float | None = None) -> pb.Tool:
    """The built-in python sandbox tool (run by the server)."""
    t = pb.Tool(python=pb.PythonTool())
    if timeout_s is not None:
        t.python.timeout_seconds = timeout_s
    return t


def function_tool(fn: Callable, *, name: str | None = None, description: str | None = None) -> pb.Tool:
    """A client function as a tool; its parameters' type hints give the JSON schema.

    Raises:
      ValueError: a parameter has no type hint or one with no JSON Schema counterpart.
    """
    hints = typing.get_type_hints(fn)
    props: dict[str, Any] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name)
        origin = typing.get_origin(hint) or hint
        if origin not in _JSON_TYPES:
            raise ValueError(f"function {fn.__name__}: parameter {p.name!r} needs a type hint among "
                             f"str, int, float, bool, list, dict, got {hint!r}")
        props[p.name] = {"type": _JSON_TYPES[origin]}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    doc = description if description is not None else (inspect.getdoc(fn) or "").split("\n\n")[0]
    return pb.Tool(function=pb.FunctionTool(name=name or fn.__name__, description=doc, parameters=json.dumps(schema)))


def user_message(text: str, images: Sequence[str | Path] = ()) -> pb.InputItem:
    """A user message with optional image files (sent inline)."""
    parts = [pb.InputContent(text=text)]
    for path in images:
        mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
        parts.append(pb.InputContent(image=pb.InputImage(data=Path(path).read_bytes(), mime_type=mime)))
    return pb.InputItem(message=pb.InputMessage(role=pb.ROLE_USER, content=parts))


def build_request(input: str | Sequence[pb.InputItem] = (), *, model: str = "", instructions: str = "",
                  tools: Sequence[pb.Tool] = (), tool_choice: str | None = None, effort: str | None = None,
                  summary: str | None = None, budget_tokens: int | None = None, max_output_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None, json_schema: Mapping | None = None,
                  previous_response_id: str = "", store: bool | None = None,
                  images: Sequence[str | Path] = ()) -> pb.CreateRequest:
    """A CreateRequest from keyword arguments (strings for enums: ``effort="low"``)."""
    items = [user_message(input, images)] if isinstance(input, str) else list(input)
    req = pb.CreateRequest(model=model, instructions=instructions, input=items, tools=list(tools),
                           previous_response_id=previous_response_id)
    if tool_choice in ("none", "auto", "required"):
        req.tool_choice.mode = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO,
                                "required": pb.ToolChoice.MODE_REQUIRED}[tool_choice]
    elif tool_choice:
        req.tool_choice.function_name = tool_choice
    if effort is not None:
        req.reasoning.effort = EFFORTS[effort]
    if summary is not None:
        req.reasoning.summary = SUMMARIES[summary]
    if budget_tokens is not None:
        req.reasoning.budget_tokens = budget_tokens
    if max_output_tokens is not None:
        req.max_output_tokens = max_output_tokens
    if temperature is not None:
        req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    if json_schema is not None:
        req.text.format.json_schema.CopyFrom(pb.JsonSchemaFormat(name="answer", schema=json.dumps(json_schema)))
    if store is not None:
        req.store = store
    return req


def function_calls(response: pb.Response) -> list[pb.FunctionCall]:
    """The client function calls a finished response ended with."""
    return [i.function_call for i in response.output if i.HasField("function_call")]


def call_local(functions: Mapping[str, Callable], call: pb.FunctionCall) -> str:
    """Runs one call against local functions; errors become the output text the model reads."""
    fn = functions.get(call.name)
    if fn is None:
        return f"error: no local function {call.name!r}"
    try:
        result = fn(**json.loads(call.arguments or "{}"))
    except Exception as e:  # the model reads what went wrong and may try again
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result)


def _metadata(api_key: str | None):
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(tls: bool | bytes) -> grpc.ChannelCredentials | None:
    if tls is False:
        return None
    return grpc.ssl_channel_credentials(root_certificates=tls if isinstance(tls, bytes) else None)


class Client:
    """Blocking client.

    Args:
      target: ``host:port``.
      api_key: sent as ``authorization: Bearer``.
      tls: False for plaintext, True for TLS with system roots, or PEM root certificates.
      timeout: default deadline in seconds of each call (None: none).
    """

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool | bytes = False,
                 timeout: float | None = None):
        creds = _credentials(tls)
        self._channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self.stub = pb_grpc.KestrelStub(self._channel)
        self._md = _metadata(api_key)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, request: pb.CreateRequest | str, *, timeout: float | None = None,
               **kw) -> Iterator[pb.ResponseEvent]:
        """Yields the events of a new response (``request`` may be text plus ``build_request`` kwargs)."""
        req = request if isinstance(request, pb.CreateRequest) else build_request(request, **kw)
        call = self.stub.Create(req, timeout=timeout or self.timeout, metadata=self._md)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op after the end; cancels the response if the caller stopped early

    def create(self, request: pb.CreateRequest | str, **kw) -> pb.Response:
        """Runs a response to its end and returns it (from the stream, no store needed)."""
        return collect_response(self.stream(request, **kw))

    def run_with_functions(self, request: pb.CreateRequest, functions: Mapping[str, Callable], *,
                           max_turns: int = 8,
                           on_event: Callable[[pb.ResponseEvent], None] | None = None) -> pb.Response:
        """Answers the model's function calls with ``functions`` until a response makes none."""
        for _ in range(max_turns):
            response = collect_response(self.stream(request), on_event)
            calls = function_calls(response)
            if not calls or response.status != pb.RESPONSE_STATUS_COMPLETED:
                return response
            outputs = [pb.InputItem(function_call_output=pb.FunctionCallOutput(
                call_id=c.call_id, output=call_local(functions, c))) for c in calls]
            follow = pb.CreateRequest(model=request.model, input=outputs, tools=request.tools,
                                      reasoning=request.reasoning, sampling=request.sampling,
                                      previous_response_id=response.id)
            if request.HasField("max_output_tokens"):
                follow.max_output_tokens = request.max_output_tokens
            request = follow
        return response

    def get(self, response_id: str) -> pb.Response:
        return self.stub.Get(pb.GetRequest(response_id=response_id), timeout=self.timeout, metadata=self._md)

    def cancel(self, response_id: str) -> pb.Response:
        return self.stub.Cancel(pb.CancelRequest(response_id=response_id), timeout=self.timeout, metadata=self._md)

    def delete(self, response_id: str) -> bool:
        return self.stub.Delete(pb.DeleteRequest(response_id=response_id), timeout=self.timeout,
                                metadata=self._md).deleted

    def list_models(self) -> list[pb.Model]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._md).models)

    def count_tokens(self, request: pb.CreateRequest) -> int:
        return self.stub.CountTokens(pb.CountTokensRequest(request=request), timeout=self.timeout,
                                     metadata=self._md).input_tokens


class AsyncClient:
    """The same over ``grpc.aio`` (use inside a running event loop)."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool | bytes = False,
                 timeout: float | None = None):
        creds = _credentials(tls)
        self._channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.KestrelStub(self._channel)
        self._md = _metadata(api_key)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def stream(self, request: pb.CreateRequest | str, *, timeout: float | None = None,
                     **kw) -> AsyncIterator[pb.ResponseEvent]:
        req = request if isinstance(request, pb.CreateRequest) else build_request(request, **kw)
        call = self.stub.Create(req, timeout=timeout or self.timeout, metadata=self._md)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def create(self, request: pb.CreateRequest | str, **kw) -> pb.Response:
        response = None
        async for e in self.stream(request, **kw):
            response = _apply(response, e)
        return response

    async def get(self, response_id: str) -> pb.Response:
        return await self.stub.Get(pb.GetRequest(response_id=response_id), timeout=self.timeout, metadata=self._md)

    async def cancel(self, response_id: str) -> pb.Response:
        return await self.stub.Cancel(pb.CancelRequest(response_id=response_id), timeout=self.timeout,
                                      metadata=self._md)

    async def delete(self, response_id: str) -> bool:
        return (await self.stub.Delete(pb.DeleteRequest(response_id=response_id), timeout=self.timeout,
                                       metadata=self._md)).deleted

    async def list_models(self) -> list[pb.Model]:
        return list((await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                                metadata=self._md)).models)

    async def count_tokens(self, request: pb.CreateRequest) -> int:
        return (await self.stub.CountTokens(pb.CountTokensRequest(request=request), timeout=self.timeout,
                                            metadata=self._md)).input_tokens


def _apply(response: pb.Response | None, e: pb.ResponseEvent) -> pb.Response:
    """Folds one event into the response being rebuilt from a stream."""
    kind = e.WhichOneof("event")
    if kind == "created":
        response = pb.Response()
        response.CopyFrom(e.created.response)
        return response
    if kind == "in_progress":
        response.status = pb.RESPONSE_STATUS_IN_PROGRESS
    elif kind == "output_item_done":
        i = e.output_item_done.output_index
        while len(response.output) <= i:
            response.output.add()
        response.output[i].CopyFrom(e.output_item_done.item)
    elif kind == "completed":
        response.status = pb.RESPONSE_STATUS_COMPLETED
        response.usage.CopyFrom(e.completed.usage)
    elif kind == "incomplete":
        cancelled = e.incomplete.reason == pb.INCOMPLETE_REASON_CANCELLED
        response.status = pb.RESPONSE_STATUS_CANCELLED if cancelled else pb.RESPONSE_STATUS_INCOMPLETE
        response.incomplete_details.reason = e.incomplete.reason
        response.usage.CopyFrom(e.incomplete.usage)
    elif kind == "failed":
        response.status = pb.RESPONSE_STATUS_FAILED
        response.error.CopyFrom(e.failed.error)
        response.usage.CopyFrom(e.failed.usage)
    return response


def collect_response(events: Iterator[pb.ResponseEvent], on_event=None) -> pb.Response:
    """The Response a stream describes, rebuilt from its events (``on_event`` sees each one)."""
    response = None
    for e in events:
        if on_event is not None:
            on_event(e)
        response = _apply(response, e)
    return response


__all__ = ["AsyncClient", "Client", "build_request", "calculator", "call_local", "collect_response", "function_calls",
           "function_tool", "python_tool", "user_message"]
