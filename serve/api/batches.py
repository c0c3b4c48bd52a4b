"""Batches: many CreateRequests queued at once, run on the same engine, results kept by id.

Every line is checked before anything runs (a line that does not validate fails the whole batch,
naming the line). Lines then run concurrently, at most ``concurrency`` at a time, so a batch never
fills the queue that interactive clients need; lines sharing a prompt prefix share the engine's
prefix cache.
"""

from __future__ import annotations

import asyncio
import collections

from google.protobuf import timestamp_pb2

from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.convert import prepare
from serve.api.errors import ApiError, invalid, not_found
from serve.api.session import ResponseRunner, new_id

MAX_LINES = 1000
_TERMINAL = (pb.BATCH_STATUS_COMPLETED, pb.BATCH_STATUS_FAILED, pb.BATCH_STATUS_CANCELLED)


def _now() -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.GetCurrentTime()
    return t


class _Batch:
    def __init__(self, proto: pb.Batch, n: int):
        self.proto = proto
        self.results: list[pb.BatchResult | None] = [None] * n
        self.tasks: list[asyncio.Task] = []
        self.records: list = []


class BatchManager:
    """Creates, runs, reports and cancels batches on the event loop of the server.

    Args:
      runner: the response runner the lines go through.
      concurrency: most lines of all batches running at once.
      max_batches: batches kept (oldest finished ones are forgotten first).
    """

    def __init__(self, runner: ResponseRunner, *, concurrency: int = 8, max_batches: int = 64):
        self.runner = runner
        self._sem: asyncio.Semaphore | None = None
        self.concurrency = concurrency
        self.max_batches = max_batches
        self._batches: collections.OrderedDict[str, _Batch] = collections.OrderedDict()

    def create(self, request: pb.CreateBatchRequest) -> pb.Batch:
        n = len(request.requests)
        if n == 0:
            raise invalid("requests is empty: a batch needs at least one line")
        if n > MAX_LINES:
            raise invalid(f"requests has {n} lines; at most {MAX_LINES} are allowed")
        ids = [line.custom_id for line in request.requests]
        for i, cid in enumerate(ids):
            if not cid:
                raise invalid(f"requests[{i}].custom_id is empty")
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        if dupes:
            raise invalid(f"requests: duplicate custom_id values {dupes}")
        proto = pb.Batch(id=new_id("batch"), status=pb.BATCH_STATUS_VALIDATING, created_at=_now(),
                         request_counts=pb.BatchRequestCounts(total=n), metadata=dict(request.metadata))
        batch = _Batch(proto, n)
        prepared = []
        for i, line in enumerate(request.requests):
            try:
                prepared.append(prepare(line.request, model=self.runner.model, records=self.runner.records,
                                        policy=self.runner.policy))
            except ApiError as e:
                proto.status = pb.BATCH_STATUS_FAILED
                proto.error.CopyFrom(pb.Error(code="invalid_request", message=f"requests[{i}]: {e.message}"))
                proto.completed_at.CopyFrom(_now())
                self._keep(batch)
                return self._view(batch, omit_results=True)
        proto.status = pb.BATCH_STATUS_IN_PROGRESS
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        for i, p in enumerate(prepared):
            batch.tasks.append(asyncio.ensure_future(self._run_line(batch, i, ids[i], p)))
        self._keep(batch)
        return self._view(batch, omit_results=True)

    def _keep(self, batch: _Batch) -> None:
        self._batches[batch.proto.id] = batch
        while len(self._batches) > self.max_batches:
            oldest = next(iter(self._batches.values()))
            if oldest.proto.status not in _TERMINAL:
                break
            self._batches.popitem(last=False)

    async def _run_line(self, batch: _Batch, i: int, custom_id: str, prepared) -> None:
        proto = batch.proto
        try:
            async with self._sem:
                if proto.status in (pb.BATCH_STATUS_CANCELLING, pb.BATCH_STATUS_CANCELLED):
                    raise asyncio.CancelledError
                run = None
                while run is None:
                    try:
                        run = await self.runner.start(prepared)
                    except ApiError as e:
                        if e.retry_after_s is None:
                            raise
                        await asyncio.sleep(e.retry_after_s)  # the queue is full: wait for room
                batch.records.append(run.record)
                async for _ in run.events():
                    pass
                response = pb.Response()
                response.CopyFrom(run.record.response)
                batch.results[i] = pb.BatchResult(custom_id=custom_id, response=response)
                failed = response.status == pb.RESPONSE_STATUS_FAILED
                proto.request_counts.failed += failed
                proto.request_counts.completed += not failed
        except asyncio.CancelledError:
            batch.results[i] = pb.BatchResult(custom_id=custom_id,
                                              error=pb.Error(code="cancelled", message="the batch was cancelled"))
            proto.request_counts.failed += 1
        except ApiError as e:
            batch.results[i] = pb.BatchResult(custom_id=custom_id,
                                              error=pb.Error(code="invalid_request", message=e.message))
            proto.request_counts.failed += 1
        finally:
            if all(r is not None for r in batch.results) and proto.status not in _TERMINAL:
                cancelling = proto.status == pb.BATCH_STATUS_CANCELLING
                proto.status = pb.BATCH_STATUS_CANCELLED if cancelling else pb.BATCH_STATUS_COMPLETED
                proto.completed_at.CopyFrom(_now())

    def _batch(self, batch_id: str) -> _Batch:
        if not batch_id:
            raise invalid("batch_id is empty")
        batch = self._batches.get(batch_id)
        if batch is None:
            raise not_found(f"batch {batch_id!r} is unknown")
        return batch

    def _view(self, batch: _Batch, *, omit_results: bool) -> pb.Batch:
        out = pb.Batch()
        out.CopyFrom(batch.proto)
        if not omit_results:
            out.results.extend(r for r in batch.results if r is not None)
        return out

    def get(self, batch_id: str, *, omit_results: bool = False) -> pb.Batch:
        return self._view(self._batch(batch_id), omit_results=omit_results)

    def cancel(self, batch_id: str) -> pb.Batch:
        batch = self._batch(batch_id)
        if batch.proto.status not in _TERMINAL:
            batch.proto.status = pb.BATCH_STATUS_CANCELLING
            for t in batch.tasks:
                t.cancel()
        return self._view(batch, omit_results=True)
