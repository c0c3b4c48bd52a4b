"""The OpenAI-compatible HTTP gateway (aiohttp), on the gRPC server's event loop and engine.

Routes: ``POST /v1/chat/completions`` (streaming or not; ``reasoning_content`` in deltas,
``tool_calls``, ``reasoning_effort``, ``response_format``, ``stream_options.include_usage``),
``POST /v1/responses`` (OpenAI's stream event names), ``GET|DELETE /v1/responses/{id}``,
``POST /v1/responses/{id}/cancel``, ``GET /v1/models``, ``GET /metrics`` (Prometheus),
``GET /health``. A client that disconnects mid-stream cancels its engine request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import grpc
from aiohttp import web

from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.auth import KeyChecker
from serve.api.convert import prepare
from serve.api.errors import OPENAI_ERROR_TYPE, ApiError, not_found
from serve.api.metrics import ServerMetrics
from serve.api.openai_schema import (chat_request, chat_usage_json, item_json, logprob_json, response_json,
                                     responses_request)
from serve.api.session import ResponseRunner, new_id

log = logging.getLogger("kestrel.api")

_FINISH = {pb.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS: "length", pb.INCOMPLETE_REASON_CANCELLED: "stop",
           pb.INCOMPLETE_REASON_DEADLINE_EXCEEDED: "length", pb.INCOMPLETE_REASON_MAX_TOOL_ROUNDS: "length"}


def _error(err: ApiError) -> web.Response:
    status = err.http_status
    headers = {"Retry-After": str(max(1, round(err.retry_after_s)))} if err.retry_after_s is not None else None
    body = {"error": {"message": err.message, "type": OPENAI_ERROR_TYPE.get(status, "invalid_request_error"),
                      "param": None, "code": err.code.name.lower()}}
    return web.json_response(body, status=status, headers=headers)


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


class _ChatStream:
    """Proto events -> Chat Completions chunks."""

    def __init__(self, model: str):
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.calls: dict[str, int] = {}  # item id -> tool_calls index
        self.finish: str | None = None
        self.usage: pb.Usage | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.error: pb.Error | None = None
        self.logprobs: list[dict] = []

    def chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None if logprobs is None else {"content": logprobs}}]}

    def on(self, e: pb.ResponseEvent) -> list[dict]:
        kind = e.WhichOneof("event")
        if kind == "created":
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "reasoning_text_delta":
            self.reasoning.append(e.reasoning_text_delta.delta)
            return [self.chunk({"reasoning_content": e.reasoning_text_delta.delta})]
        if kind == "output_text_delta":
            d = e.output_text_delta
            self.content.append(d.delta)
            records = [logprob_json(r) for r in d.logprobs] if d.logprobs else None
            if records:
                self.logprobs += records
            return [self.chunk({"content": d.delta}, logprobs=records)]
        if kind == "output_item_added" and e.output_item_added.item.HasField("function_call"):
            item = e.output_item_added.item
            index = self.calls[item.id] = len(self.calls)
            self.tool_calls.append({"id": item.function_call.call_id, "type": "function",
                                    "function": {"name": item.function_call.name, "arguments": ""}})
            return [self.chunk({"tool_calls": [{"index": index, "id": item.function_call.call_id, "type": "function",
                                                "function": {"name": item.function_call.name, "arguments": ""}}]})]
        if kind == "function_call_arguments_delta" and e.function_call_arguments_delta.item_id in self.calls:
            d = e.function_call_arguments_delta
            index = self.calls[d.item_id]
            self.tool_calls[index]["function"]["arguments"] += d.delta
            return [self.chunk({"tool_calls": [{"index": index, "function": {"arguments": d.delta}}]})]
        if kind == "completed":
            self.usage = e.completed.usage
            self.finish = "tool_calls" if self.calls else "stop"
        elif kind == "incomplete":
            self.usage = e.incomplete.usage
            self.finish = _FINISH.get(e.incomplete.reason, "stop")
        elif kind == "failed":
            self.usage, self.error = e.failed.usage, e.failed.error
            self.finish = "error"
        if self.finish is not None:
            return [self.chunk({}, self.finish)]
        return []

    def completion(self) -> dict:
        msg: dict = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": msg, "finish_reason": self.finish,
                             "logprobs": {"content": self.logprobs} if self.logprobs else None}],
                "usage": chat_usage_json(self.usage or pb.Usage())}


class _ResponsesStream:
    """Proto events -> Responses API stream events (OpenAI's names, renumbered)."""

    def __init__(self, record):
        self.record = record
        self.seq = 0

    def ev(self, type_: str, **fields) -> dict:
        out = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return out

    def on(self, e: pb.ResponseEvent) -> list[dict]:
        kind = e.WhichOneof("event")
        x = getattr(e, kind)
        live = lambda: response_json(self.record.response)  # noqa: E731
        if kind == "created":
            return [self.ev("response.created", response=response_json(x.response))]
        if kind == "in_progress":
            return [self.ev("response.in_progress", response=live())]
        if kind == "output_item_added":
            out = [self.ev("response.output_item.added", output_index=x.output_index, item=item_json(x.item))]
            if x.item.HasField("message"):
                out.append(self.ev("response.content_part.added", item_id=x.item.id, output_index=x.output_index,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            return out
        if kind == "output_item_done":
            out = []
            if x.item.HasField("message"):
                out.append(self.ev("response.content_part.done", item_id=x.item.id, output_index=x.output_index,
                                   content_index=0, part={"type": "output_text", "annotations": [],
                                                          "text": x.item.message.content[0].text}))
            return out + [self.ev("response.output_item.done", output_index=x.output_index, item=item_json(x.item))]
        if kind == "reasoning_text_delta":
            return [self.ev("response.reasoning_text.delta", item_id=x.item_id, output_index=x.output_index,
                            content_index=x.content_index, delta=x.delta)]
        if kind == "reasoning_text_done":
            return [self.ev("response.reasoning_text.done", item_id=x.item_id, output_index=x.output_index,
                            content_index=x.content_index, text=x.text)]
        if kind == "reasoning_summary_text_delta":
            part = dict(item_id=x.item_id, output_index=x.output_index, summary_index=x.summary_index)
            return [self.ev("response.reasoning_summary_part.added", **part, part={"type": "summary_text", "text": ""}),
                    self.ev("response.reasoning_summary_text.delta", **part, delta=x.delta)]
        if kind == "reasoning_summary_text_done":
            part = dict(item_id=x.item_id, output_index=x.output_index, summary_index=x.summary_index)
            return [self.ev("response.reasoning_summary_text.done", **part, text=x.text),
                    self.ev("response.reasoning_summary_part.done", **part,
                            part={"type": "summary_text", "text": x.text})]
        if kind == "output_text_delta":
            return [self.ev("response.output_text.delta", item_id=x.item_id, output_index=x.output_index,
                            content_index=x.content_index, delta=x.delta,
                            logprobs=[logprob_json(r) for r in x.logprobs])]
        if kind == "output_text_done":
            return [self.ev("response.output_text.done", item_id=x.item_id, output_index=x.output_index,
                            content_index=x.content_index, text=x.text, logprobs=[])]
        if kind == "function_call_arguments_delta":
            return [self.ev("response.function_call_arguments.delta", item_id=x.item_id,
                            output_index=x.output_index, delta=x.delta)]
        if kind == "function_call_arguments_done":
            return [self.ev("response.function_call_arguments.done", item_id=x.item_id,
                            output_index=x.output_index, name=x.name, arguments=x.arguments)]
        if kind == "tool_execution_started":
            return [self.ev("response.tool_execution.started", item_id=x.item_id, output_index=x.output_index,
                            call_id=x.call_id, name=x.name, arguments=x.arguments)]
        if kind == "tool_execution_finished":
            return [self.ev("response.tool_execution.finished", item_id=x.item_id, output_index=x.output_index,
                            call_id=x.call_id, name=x.name, output=x.output, is_error=x.is_error)]
        name = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
        return [self.ev(name[kind], response=live())]


class HttpGateway:
    """The aiohttp application and its site.

    Args:
      runner: the response runner shared with the gRPC servicer.
      keys: API keys (``Authorization: Bearer``); disabled when empty.
      metrics: rendered at ``/metrics``.
    """

    def __init__(self, runner: ResponseRunner, keys: KeyChecker, metrics: ServerMetrics):
        self.runner, self.keys, self.metrics = runner, keys, metrics
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/responses", self.responses),
            web.get("/v1/responses/{id}", self.get_response),
            web.delete("/v1/responses/{id}", self.delete_response),
            web.post("/v1/responses/{id}/cancel", self.cancel_response),
            web.get("/metrics", self.metrics_page),
            web.get("/health", self.health),
        ])
        self.app = app
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Binds and serves; returns the bound port (``port`` 0 picks one)."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path not in ("/health", "/metrics"):
            problem = self.keys.problem(request.headers.get("Authorization"))
            if problem is not None:
                return _error(ApiError(grpc.StatusCode.UNAUTHENTICATED, problem))
        return await handler(request)

    async def _body(self, request: web.Request) -> dict:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not valid JSON: {e}") from None

    async def _start(self, req: pb.CreateRequest):
        prepared = prepare(req, model=self.runner.model, records=self.runner.records, policy=self.runner.policy)
        return await self.runner.start(prepared)

    async def models(self, request: web.Request) -> web.Response:
        m = self.runner.model
        return web.json_response({"object": "list", "data": [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "kestrel",
             "context_length": m.context_length, "max_output_tokens": m.max_output_tokens}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            req, stream, include_usage = chat_request(await self._body(request))
            run = await self._start(req)
        except ApiError as e:
            return _error(e)
        translator = _ChatStream(self.runner.model.id)
        if not stream:
            async with contextlib.aclosing(run.events()) as events:
                async for e in events:
                    translator.on(e)
            return web.json_response(translator.completion())
        # Everything after ``start`` runs inside aclosing: a client gone at any point (even before
        # the first byte) closes the event generator, which cancels the engine request.
        async with contextlib.aclosing(run.events()) as events:
            resp = await _sse(request)
            async for e in events:
                for chunk in translator.on(e):
                    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if include_usage:
            tail = translator.chunk({}, None)
            tail["choices"] = []
            tail["usage"] = chat_usage_json(translator.usage or pb.Usage())
            await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        try:
            req, stream = responses_request(await self._body(request))
            run = await self._start(req)
        except ApiError as e:
            return _error(e)
        if not stream:
            async with contextlib.aclosing(run.events()) as events:
                async for _ in events:
                    pass
            return web.json_response(response_json(run.record.response))
        translator = _ResponsesStream(run.record)
        async with contextlib.aclosing(run.events()) as events:
            resp = await _sse(request)
            async for e in events:
                for out in translator.on(e):
                    await resp.write(f"event: {out['type']}\ndata: ".encode() + json.dumps(out).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    def _record(self, request: web.Request):
        rid = request.match_info["id"]
        rec = self.runner.records.get(rid)
        if rec is None:
            raise not_found(f"response {rid!r} is unknown (never stored, deleted or evicted)")
        return rec

    async def get_response(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(response_json(self._record(request).response))
        except ApiError as e:
            return _error(e)

    async def cancel_response(self, request: web.Request) -> web.Response:
        try:
            rec = self._record(request)
        except ApiError as e:
            return _error(e)
        if not rec.done:
            self.runner.cancel(rec)
        return web.json_response(response_json(rec.response))

    async def delete_response(self, request: web.Request) -> web.Response:
        try:
            rec = self._record(request)
        except ApiError as e:
            return _error(e)
        if not rec.done:
            self.runner.cancel(rec)
        self.runner.records.pop(rec.response.id)
        self.runner.forget(rec)
        return web.json_response({"id": rec.response.id, "object": "response.deleted", "deleted": True})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        ok = self.runner.accepting
        return web.json_response({"status": "serving" if ok else "not_serving"}, status=200 if ok else 503)
