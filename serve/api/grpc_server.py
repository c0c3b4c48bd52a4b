"""The ``kestrel.v1.Kestrel`` gRPC service on ``grpc.aio``.

Refusals (``ApiError``) become the call's status before any event. A call's deadline becomes the
engine request's deadline; a cancelled call (or a client that went away) closes the event
generator, which cancels the engine request at once.
"""

from __future__ import annotations

import contextlib
import logging

import grpc

from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from serve.api.batches import BatchManager
from serve.api.convert import prepare
from serve.api.errors import ApiError, invalid, not_found
from serve.api.session import ResponseRunner

log = logging.getLogger("kestrel.api")


async def _abort(context: grpc.aio.ServicerContext, err: ApiError, rpc: str, metrics) -> None:
    metrics.requests.labels(rpc, err.code.name).inc()
    if err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(err.retry_after_s * 1000))),))
    log.info("request refused", extra={"fields": {"rpc": rpc, "code": err.code.name, "error": err.message}})
    await context.abort(err.code, err.message)


class KestrelServicer(pb_grpc.KestrelServicer):
    """Implements every RPC of the Kestrel service over a ``ResponseRunner``."""

    def __init__(self, runner: ResponseRunner, batches: BatchManager):
        self.runner = runner
        self.batches = batches

    @property
    def metrics(self):
        return self.runner.metrics

    async def Create(self, request, context):
        try:
            prepared = prepare(request, model=self.runner.model, records=self.runner.records,
                               policy=self.runner.policy)
            remaining = context.time_remaining()
            run = await self.runner.start(prepared, deadline_s=remaining)
        except ApiError as e:
            await _abort(context, e, "Create", self.metrics)
            return
        self.metrics.requests.labels("Create", "OK").inc()
        # aclosing: a cancelled call must close the generator now (it cancels the engine request),
        # not whenever the garbage collector gets to it.
        async with contextlib.aclosing(run.events()) as events:
            async for event in events:
                yield event

    def _record(self, response_id: str):
        if not response_id:
            raise invalid("response_id is empty")
        rec = self.runner.records.get(response_id)
        if rec is None:
            raise not_found(f"response {response_id!r} is unknown (never stored, deleted or evicted)")
        return rec

    async def Get(self, request, context):
        try:
            rec = self._record(request.response_id)
        except ApiError as e:
            await _abort(context, e, "Get", self.metrics)
            return
        out = pb.Response()
        out.CopyFrom(rec.response)
        return out

    async def Cancel(self, request, context):
        try:
            rec = self._record(request.response_id)
        except ApiError as e:
            await _abort(context, e, "Cancel", self.metrics)
            return
        if not rec.done:
            self.runner.cancel(rec)
        out = pb.Response()
        out.CopyFrom(rec.response)
        return out

    async def Delete(self, request, context):
        if not request.response_id:
            await _abort(context, invalid("response_id is empty"), "Delete", self.metrics)
            return
        rec = self.runner.records.get(request.response_id)
        if rec is None:
            return pb.DeleteResponse(response_id=request.response_id, deleted=False)
        if not rec.done:
            self.runner.cancel(rec)
        self.runner.records.pop(request.response_id)
        self.runner.forget(rec)
        return pb.DeleteResponse(response_id=request.response_id, deleted=True)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self.runner.model.to_proto(is_default=True)])

    async def CountTokens(self, request, context):
        try:
            prepared = prepare(request.request, model=self.runner.model, records=self.runner.records,
                               policy=self.runner.policy)
            n = count_prompt_tokens(self.runner, prepared)
        except ApiError as e:
            await _abort(context, e, "CountTokens", self.metrics)
            return
        return pb.CountTokensResponse(input_tokens=n, context_length=self.runner.model.context_length)

    async def CreateBatch(self, request, context):
        try:
            return self.batches.create(request)
        except ApiError as e:
            await _abort(context, e, "CreateBatch", self.metrics)

    async def GetBatch(self, request, context):
        try:
            return self.batches.get(request.batch_id, omit_results=request.omit_results)
        except ApiError as e:
            await _abort(context, e, "GetBatch", self.metrics)

    async def CancelBatch(self, request, context):
        try:
            return self.batches.cancel(request.batch_id)
        except ApiError as e:
            await _abort(context, e, "CancelBatch", self.metrics)


def count_prompt_tokens(runner: ResponseRunner, prepared) -> int:
    """The prompt length Create would submit.

    The engine has no public counting entry point yet; this asks its prompt builder (the same code
    ``submit`` runs) so the count is exact, tool schemas and stored history included.
    """
    engine = runner.engine
    prev = prepared.previous.engine_ids[-1] if prepared.previous is not None else None
    req = runner.engine_request(prepared, messages=prepared.messages, tool_choice=prepared.tool_choice,
                                params=prepared.params, previous_response_id=prev)
    schemas = tuple({"type": "function", "function": {"name": t.name, "description": t.description,
                                                      "parameters": dict(t.parameters)}}
                    for t in prepared.tools)
    try:
        prompt, *_ = engine._prompt(req, schemas)
    except ValueError as e:
        if "previous_response_id" in str(e):
            raise not_found(str(e)) from None
        raise invalid(str(e)) from None
    return len(prompt)

