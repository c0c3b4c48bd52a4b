"""One response from start to end: engine rounds, built-in tool rounds, typed proto events.

``ResponseRunner.start`` checks a prepared request against the engine (prompt length, KV pool,
stored conversation) and submits its first round; ``ResponseRun.events()`` then yields the
``ResponseEvent`` protos of the Kestrel API in order. When a round ends in built-in tool calls
(``calculator``, ``python``) the run executes them (``serve.tool_loop``), streams
``tool_execution_started/finished`` and continues the same response with the results as the next
engine round; client functions end the response with ``function_call`` items instead.

Closing the generator early (the client went away, the call was cancelled, the server shuts down)
cancels the running engine request at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator

from google.protobuf import duration_pb2, timestamp_pb2

from protos.kestrel.v1 import kestrel_pb2 as pb
from serve import events as ev
from serve.api.convert import EFFORTS, SUMMARIES, ModelInfo, Policy, Prepared
from serve.api.errors import ApiError, invalid
from serve.api.metrics import ServerMetrics
from serve.api.records import RecordStore, ResponseRecord
from serve.engine import Engine, EngineRequest
from serve.summaries import summary_request_fields
from serve.tool_loop import run_builtin

import grpc

# The API's enums by the engine's names (UNSPECIFIED, the request default, maps to a real value).
_EFFORT_ENUM = {name: value for value, name in EFFORTS.items() if value != pb.REASONING_EFFORT_UNSPECIFIED}
_SUMMARY_ENUM = {name: value for value, name in SUMMARIES.items() if value != pb.REASONING_SUMMARY_UNSPECIFIED}

log = logging.getLogger("kestrel.api")

_REASONS = {"length": pb.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS, "cancelled": pb.INCOMPLETE_REASON_CANCELLED,
            "deadline": pb.INCOMPLETE_REASON_DEADLINE_EXCEEDED}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _now() -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.GetCurrentTime()
    return t


def usage_proto(u: ev.Usage) -> pb.Usage:
    return pb.Usage(input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
                    output_tokens=u.output_tokens, reasoning_tokens=u.reasoning_tokens,
                    answer_tokens=u.answer_tokens, tool_call_tokens=u.tool_call_tokens,
                    total_tokens=u.total_tokens, image_tokens=u.image_tokens,
                    accepted_prediction_tokens=u.accepted_prediction_tokens,
                    rejected_prediction_tokens=u.rejected_prediction_tokens)


def _add_usage(a: ev.Usage, b: ev.Usage) -> ev.Usage:
    return ev.Usage(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(ev.Usage)})


async def pump(handle) -> AsyncIterator[ev.Event]:
    """The engine handle's events, read without holding a worker thread per stream.

    ``RequestHandle.events_async`` parks one thread of the default executor per stream in a
    blocking ``queue.get``; with more streams than executor threads the server would stall, so
    this polls the handle's public ``events`` list with a short backoff (1-10 ms) instead.
    """
    i, delay = 0, 0.001
    while True:
        events = handle.events
        n = len(events)
        if i < n:
            for e in events[i:n]:
                yield e
                if isinstance(e, ev.Finished):
                    return
            i, delay = n, 0.001
        else:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)


class ResponseRunner:
    """Starts responses on one engine; shared by the gRPC servicer and the HTTP gateway.

    Args:
      engine: the running engine.
      model: the served model's description and limits.
      records: the response records (Get, Cancel, previous_response_id).
      policy: effort budgets and tool limits.
      metrics: where latencies and counts go.
      max_queued: most responses running or waiting at once; past it ``start`` refuses with
        RESOURCE_EXHAUSTED.
    """

    def __init__(self, engine: Engine, model: ModelInfo, records: RecordStore, policy: Policy,
                 metrics: ServerMetrics, *, max_queued: int = 256):
        self.engine, self.model, self.records, self.policy = engine, model, records, policy
        self.metrics = metrics
        self.max_queued = max_queued
        self.active = 0
        self.accepting = True
        self._token_bytes: list[bytes] | None = None

    @property
    def token_bytes(self) -> list[bytes]:
        """Each token id's bytes (for log-probability records), read once from the tokenizer."""
        if self._token_bytes is None:
            tok = self.engine.tokenizer
            self._token_bytes = tok.token_bytes() if tok is not None else []
        return self._token_bytes

    async def start(self, prepared: Prepared, *, deadline_s: float | None = None) -> ResponseRun:
        """Submits the first round; raises ApiError when the engine refuses the request."""
        if not self.accepting:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", retry_after_s=1.0)
        if self.active >= self.max_queued:
            self.metrics.rejected.inc()
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the server is at capacity ({self.active} responses running or queued); "
                           f"retry after 1s", retry_after_s=1.0)
        response = pb.Response(id=new_id("resp"), model=self.model.id, status=pb.RESPONSE_STATUS_QUEUED,
                               created_at=_now(), metadata=prepared.metadata)
        if prepared.previous is not None:
            response.previous_response_id = prepared.previous.response.id
        record = ResponseRecord(response, stored=prepared.store)
        run = ResponseRun(self, prepared, record, deadline_s)
        self.active += 1
        try:
            await run.submit_round(first=True)
        except BaseException:
            self.active -= 1
            raise
        for old in self.records.put(record):
            for eid in old.engine_ids:
                self.engine.delete_response(eid)
        return run

    def engine_request(self, prepared: Prepared, **kw) -> EngineRequest:
        return EngineRequest(tools=prepared.tools, parallel_tool_calls=prepared.parallel_tool_calls,
                             response_format=prepared.response_format, effort=prepared.effort,
                             reasoning_budget=prepared.reasoning_budget,
                             speculative=prepared.speculative, cache_salt=prepared.cache_salt, **kw)

    def cancel(self, record: ResponseRecord) -> None:
        record.cancelled = True
        if record.running_id is not None:
            self.engine.cancel(record.running_id)

    def forget(self, record: ResponseRecord) -> None:
        for eid in record.engine_ids:
            self.engine.delete_response(eid)
        record.engine_ids.clear()


class ResponseRun:
    """The state of one running response; iterate ``events()`` once."""

    def __init__(self, runner: ResponseRunner, prepared: Prepared, record: ResponseRecord,
                 deadline_s: float | None):
        self.runner, self.prepared, self.record = runner, prepared, record
        self.deadline_at = None if deadline_s is None else time.monotonic() + deadline_s
        self.seq = 0
        self.round = 0
        self.handle = None
        self.first_handle = None  # the first round's: its effort and budget describe the response
        self.usage = ev.Usage()
        self.tool_messages: list[dict] = []
        self.tool_choice = prepared.tool_choice
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # Open items: reasoning, message, and this round's calls by engine index.
        self.rs: pb.OutputItem | None = None
        self.rs_index = 0
        self.msg: pb.OutputItem | None = None
        self.msg_index = 0
        self.calls: dict[int, tuple[pb.OutputItem, int]] = {}
        self.builtin_calls: list[tuple[pb.OutputItem, int]] = []
        self.client_calls = 0
        self.answer_emitted = ""
        self.answer_held = ""
        self.stop_hit = False
        # Reasoning of earlier rounds: a round's summary covers the response's reasoning so far.
        self.reasoning_so_far: list[str] = []
        self.summary_tokens = 0
        self.logprobs_held: tuple = ()  # answer tokens' samples not yet sent with their text

    # ------------------------------------------------------------------ engine rounds

    async def submit_round(self, *, first: bool = False) -> None:
        p, rec = self.prepared, self.record
        used = self.usage.output_tokens
        remaining = p.params.max_tokens - used
        deadline = None
        if self.deadline_at is not None:
            deadline = max(self.deadline_at - time.monotonic(), 1e-3)
        eid = rec.response.id if first else f"{rec.response.id}_{self.round}"
        if first:
            prev = p.previous
            previous_id = prev.engine_ids[-1] if prev is not None else None
            # Tool results come right after the turn that called them, before any new instructions.
            messages = (list(prev.carried_tool_messages) if prev is not None else []) + list(p.messages)
        else:
            messages, previous_id = self.tool_messages, rec.engine_ids[-1]
            self.tool_messages = []
        params = dataclasses.replace(p.params, max_tokens=remaining)
        req = self.runner.engine_request(p, messages=messages, tool_choice=self.tool_choice, params=params,
                                         previous_response_id=previous_id, store=True, deadline=deadline,
                                         request_id=eid, strict_max_tokens=first and p.explicit_max_tokens)
        try:
            self.handle = await asyncio.to_thread(self.runner.engine.submit, req)
            if first:
                self.first_handle = self.handle
        except ValueError as e:
            msg = str(e)
            if "previous_response_id" in msg:
                raise ApiError(grpc.StatusCode.NOT_FOUND, msg) from None
            raise invalid(msg) from None
        rec.running_id = eid
        rec.engine_ids.append(eid)

    def _event(self, **kw) -> pb.ResponseEvent:
        e = pb.ResponseEvent(sequence_number=self.seq, **kw)
        self.seq += 1
        return e

    def _add_item(self, item: pb.OutputItem) -> tuple[pb.OutputItem, int, pb.ResponseEvent]:
        out = self.record.response.output
        index = len(out)
        stored = out.add()
        stored.CopyFrom(item)
        return stored, index, self._event(output_item_added=pb.OutputItemAdded(output_index=index, item=item))

    def _done_item(self, item: pb.OutputItem, index: int, status=pb.ITEM_STATUS_COMPLETED) -> pb.ResponseEvent:
        item.status = status
        return self._event(output_item_done=pb.OutputItemDone(output_index=index, item=item))

    async def events(self) -> AsyncIterator[pb.ResponseEvent]:
        rec, runner = self.record, self.runner
        created = pb.Response()
        created.CopyFrom(rec.response)
        terminal = False
        try:
            yield self._event(created=pb.ResponseCreated(response=created))
            while True:
                started = False
                finished: ev.Finished | None = None
                async for e in pump(self.handle):
                    if not started:
                        started = True
                        if self.round == 0:
                            rec.response.status = pb.RESPONSE_STATUS_IN_PROGRESS
                            yield self._event(in_progress=pb.ResponseInProgress(response_id=rec.response.id))
                    if isinstance(e, ev.Finished):
                        finished = e  # the last event: pump ends by itself
                        continue
                    self._tick()
                    if self.rs is not None and not isinstance(e, ev.ReasoningDelta):
                        async for out in self._finish_reasoning(forced=getattr(e, "forced", False)):
                            yield out
                    for out in self._translate(e):
                        yield out
                rec.running_id = None
                self.usage = _add_usage(self.usage, finished.usage)
                if self.rs is not None:
                    ok = finished.reason in ("stop", "tool_calls")
                    async for out in self._finish_reasoning(
                            forced=False, status=pb.ITEM_STATUS_COMPLETED if ok else pb.ITEM_STATUS_INCOMPLETE):
                        yield out
                for out in self._close_text_items(finished.reason):
                    yield out
                if finished.reason == "tool_calls" and self.builtin_calls and not rec.cancelled:
                    async for out in self._run_builtins():
                        yield out
                    if rec.cancelled:  # Cancel came while the tools ran
                        finished = ev.Finished("cancelled", finished.usage)
                    elif self.client_calls:
                        rec.carried_tool_messages, self.tool_messages = self.tool_messages, []
                        finished = ev.Finished("tool_calls", finished.usage)
                    elif self.round + 1 > runner.policy.max_tool_rounds:
                        finished = ev.Finished("max_tool_rounds", finished.usage)
                    elif self.usage.output_tokens >= self.prepared.params.max_tokens:
                        finished = ev.Finished("length", finished.usage)
                    else:
                        self.round += 1
                        if self.tool_choice not in ("none", "auto"):
                            self.tool_choice = "auto"  # a forced call was made; let the model answer
                        try:
                            await self.submit_round()
                        except ApiError as err:
                            # The tool results no longer fit the context: the model's limit ends
                            # the response (INCOMPLETE, as max_output_tokens would), anything else fails it.
                            full = "model's context" in err.message
                            yield self._terminal("length" if full else "error", err.message)
                            terminal = True
                            return
                        continue
                yield self._terminal(finished.reason)
                terminal = True
                return
        finally:
            if not terminal:
                # The stream was closed early: the client cancelled or went away, or shutdown.
                if rec.running_id is not None:
                    runner.engine.cancel(rec.running_id)
                    rec.running_id = None
                self._finish_record(pb.RESPONSE_STATUS_CANCELLED, "cancelled")
            runner.active -= 1

    def _tick(self) -> None:
        now = time.perf_counter()
        m = self.runner.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            m.ttft.observe(now - self.t0)
        elif self.last_token_at is not None:
            m.inter_token.observe(now - self.last_token_at)
        self.last_token_at = now

    # ------------------------------------------------------------------ translation

    def _translate(self, e: ev.Event) -> list[pb.ResponseEvent]:
        out: list[pb.ResponseEvent] = []
        if isinstance(e, ev.ReasoningDelta):
            if self.rs is None:
                item = pb.OutputItem(id=new_id("rs"), status=pb.ITEM_STATUS_IN_PROGRESS,
                                     reasoning=pb.ReasoningItem(content=[pb.ReasoningText(text="")]))
                self.rs, self.rs_index, added = self._add_item(item)
                out.append(added)
            self.rs.reasoning.content[0].text += e.text
            out.append(self._event(reasoning_text_delta=pb.ReasoningTextDelta(
                item_id=self.rs.id, output_index=self.rs_index, content_index=0, delta=e.text)))
        elif isinstance(e, ev.ReasoningDone):
            pass  # events() closed the reasoning item (and ran its summary) before this event
        elif isinstance(e, ev.AnswerDelta):
            out += self._answer(e.text, e.logprobs)
        elif isinstance(e, ev.ToolCallName):
            call_id = new_id("call")
            if e.name in self.prepared.builtins:
                item = pb.OutputItem(id=new_id("tc"), status=pb.ITEM_STATUS_IN_PROGRESS,
                                     builtin_tool_call=pb.BuiltinToolCall(call_id=call_id, name=e.name))
            else:
                item = pb.OutputItem(id=new_id("fc"), status=pb.ITEM_STATUS_IN_PROGRESS,
                                     function_call=pb.FunctionCall(call_id=call_id, name=e.name))
            stored, index, added = self._add_item(item)
            self.calls[e.index] = (stored, index)
            out.append(added)
        elif isinstance(e, ev.ToolCallArgumentsDelta):
            item, index = self.calls[e.index]
            call = item.function_call if item.HasField("function_call") else item.builtin_tool_call
            out.append(self._event(function_call_arguments_delta=pb.FunctionCallArgumentsDelta(
                item_id=item.id, output_index=index, call_id=call.call_id, name=call.name, delta=e.text)))
        elif isinstance(e, ev.ToolCallDone):
            item, index = self.calls[e.index]
            builtin = item.HasField("builtin_tool_call")
            call = item.builtin_tool_call if builtin else item.function_call
            call.arguments = e.arguments
            out.append(self._event(function_call_arguments_done=pb.FunctionCallArgumentsDone(
                item_id=item.id, output_index=index, call_id=call.call_id, name=call.name,
                arguments=e.arguments)))
            if builtin:
                self.builtin_calls.append((item, index))
            else:
                self.client_calls += 1
                self.record.pending_calls[call.call_id] = call.name
                out.append(self._done_item(item, index))
        return out

    async def _finish_reasoning(self, forced: bool, status=pb.ITEM_STATUS_COMPLETED
                                ) -> AsyncIterator[pb.ResponseEvent]:
        """Closes the open reasoning item: its text, its summary (a model pass) and done."""
        item, index = self.rs, self.rs_index
        self.rs = None
        text = item.reasoning.content[0].text
        item.reasoning.budget_exhausted = forced
        self.reasoning_so_far.append(text)
        yield self._event(reasoning_text_done=pb.ReasoningTextDone(
            item_id=item.id, output_index=index, content_index=0, text=text))
        if self.prepared.summary != "none" and text.strip():
            summary = item.reasoning.summary.add(text="")
            async for delta in self._summary_pass("\n".join(self.reasoning_so_far)):
                summary.text += delta
                yield self._event(reasoning_summary_text_delta=pb.ReasoningSummaryTextDelta(
                    item_id=item.id, output_index=index, summary_index=0, delta=delta))
            yield self._event(reasoning_summary_text_done=pb.ReasoningSummaryTextDone(
                item_id=item.id, output_index=index, summary_index=0, text=summary.text))
        yield self._done_item(item, index, status)

    async def _summary_pass(self, reasoning: str) -> AsyncIterator[str]:
        """The served model's summary of `reasoning`, streamed (see ``serve/summaries.py``).

        Its tokens are not part of the response's output budget or usage; the response's log line
        records them as ``summary_tokens``. A summary that cannot run (the reasoning no longer
        fits the context, the engine is shutting down) is left empty rather than failing the
        response it describes.
        """
        engine = self.runner.engine
        req = EngineRequest(request_id=new_id("sum"), **summary_request_fields(reasoning, self.prepared.summary))
        try:
            handle = await asyncio.to_thread(engine.submit, req)
        except (ValueError, RuntimeError) as e:
            log.warning("reasoning summary skipped: %s", e)
            return
        try:
            async for e in pump(handle):
                if isinstance(e, ev.AnswerDelta) and e.text:
                    yield e.text
                elif isinstance(e, ev.Finished):
                    self.summary_tokens += e.usage.output_tokens
        finally:
            if not handle.finished:
                engine.cancel(handle.request_id)

    def _answer(self, text: str, logprobs: tuple = ()) -> list[pb.ResponseEvent]:
        out: list[pb.ResponseEvent] = []
        if self.stop_hit:
            return out
        self.logprobs_held += logprobs
        stops = self.prepared.stop
        if stops:
            self.answer_held += text
            full = self.answer_emitted + self.answer_held
            longest = max(len(s) for s in stops)
            start = max(0, len(self.answer_emitted) - longest)
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                text = full[len(self.answer_emitted):min(hits)]
                self.stop_hit = True
                self.answer_held = ""
                self.runner.engine.cancel(self.record.running_id)
            else:
                keep = longest - 1
                cut = max(0, len(self.answer_held) - keep)
                text, self.answer_held = self.answer_held[:cut], self.answer_held[cut:]
        if not text:
            return out
        return out + self._emit_answer(text)

    def _emit_answer(self, text: str) -> list[pb.ResponseEvent]:
        """Emits answer text with the log-probabilities of the tokens held so far (text held back
        for stop strings keeps its tokens' records until it is emitted)."""
        out = []
        if self.msg is None:
            item = pb.OutputItem(id=new_id("msg"), status=pb.ITEM_STATUS_IN_PROGRESS,
                                 message=pb.OutputMessage(content=[pb.OutputText(text="")]))
            self.msg, self.msg_index, added = self._add_item(item)
            out.append(added)
        records, self.logprobs_held = [self._token_logprob(s) for s in self.logprobs_held], ()
        part = self.msg.message.content[0]
        part.text += text
        part.logprobs.extend(records)
        self.answer_emitted += text
        out.append(self._event(output_text_delta=pb.OutputTextDelta(
            item_id=self.msg.id, output_index=self.msg_index, content_index=0, delta=text, logprobs=records)))
        return out

    def _token_logprob(self, sample) -> pb.TokenLogprob:
        spell = self.runner.token_bytes

        def text(i: int) -> tuple[str, bytes]:
            b = spell[i] if 0 <= i < len(spell) else b""
            return b.decode("utf-8", errors="replace"), b

        t, b = text(sample.token_id)
        top = [pb.TopLogprob(token=text(i)[0], token_id=i, logprob=lp, bytes=text(i)[1])
               for i, lp in sample.top_logprobs]
        return pb.TokenLogprob(token=t, token_id=sample.token_id, logprob=sample.logprob or 0.0, bytes=b,
                               top_logprobs=top)

    def _close_text_items(self, reason: str) -> list[pb.ResponseEvent]:
        ok = reason in ("stop", "tool_calls") or self.stop_hit
        status = pb.ITEM_STATUS_COMPLETED if ok else pb.ITEM_STATUS_INCOMPLETE
        out: list[pb.ResponseEvent] = []
        if self.answer_held and not self.stop_hit:
            held, self.answer_held = self.answer_held, ""
            out += self._emit_answer(held)
        if self.msg is not None:
            item, index = self.msg, self.msg_index
            self.msg = None
            out.append(self._event(output_text_done=pb.OutputTextDone(
                item_id=item.id, output_index=index, content_index=0, text=item.message.content[0].text)))
            out.append(self._done_item(item, index, status))
        for item, index in self.calls.values():
            if item.status == pb.ITEM_STATUS_IN_PROGRESS and not (
                    item.HasField("builtin_tool_call") and reason == "tool_calls"):
                out.append(self._done_item(item, index, pb.ITEM_STATUS_INCOMPLETE))
        self.calls = {}
        return out

    async def _run_builtins(self) -> AsyncIterator[pb.ResponseEvent]:
        limit = self.runner.policy.python_timeout_s
        for item, index in self.builtin_calls:
            call = item.builtin_tool_call
            yield self._event(tool_execution_started=pb.ToolExecutionStarted(
                item_id=item.id, output_index=index, call_id=call.call_id, name=call.name,
                arguments=call.arguments))
            timeout = self.prepared.builtins.get(call.name) or limit
            outcome = await asyncio.to_thread(run_builtin, call.name, call.arguments, python_timeout_s=timeout)
            self.runner.metrics.tool_runs.labels(call.name, "error" if outcome.is_error else "ok").inc()
            call.output, call.is_error = outcome.output, outcome.is_error
            yield self._event(tool_execution_finished=pb.ToolExecutionFinished(
                item_id=item.id, output_index=index, call_id=call.call_id, name=call.name,
                output=outcome.output, is_error=outcome.is_error,
                duration=duration_pb2.Duration(seconds=int(outcome.duration_s),
                                               nanos=int((outcome.duration_s % 1) * 1e9))))
            yield self._done_item(item, index)
            self.tool_messages.append({"role": "tool", "tool_call_id": call.call_id, "content": outcome.output})
        self.builtin_calls = []

    # ------------------------------------------------------------------ the end

    def _terminal(self, reason: str, message: str = "") -> pb.ResponseEvent:
        rid = self.record.response.id
        usage = usage_proto(self.usage)
        if self.stop_hit and reason == "cancelled":
            reason = "stop"  # the API cancelled the engine request itself, at a stop string
        if reason in ("stop", "tool_calls"):
            self._finish_record(pb.RESPONSE_STATUS_COMPLETED, reason)
            return self._event(completed=pb.ResponseCompleted(response_id=rid, usage=usage))
        if reason == "max_tool_rounds" or reason in _REASONS:
            code = pb.INCOMPLETE_REASON_MAX_TOOL_ROUNDS if reason == "max_tool_rounds" else _REASONS[reason]
            status = pb.RESPONSE_STATUS_CANCELLED if reason == "cancelled" else pb.RESPONSE_STATUS_INCOMPLETE
            self._finish_record(status, reason, incomplete=code)
            return self._event(incomplete=pb.ResponseIncomplete(response_id=rid, reason=code, usage=usage))
        error = pb.Error(code="server_error", message=message or f"the engine stopped the response ({reason})")
        self._finish_record(pb.RESPONSE_STATUS_FAILED, reason, error=error)
        return self._event(failed=pb.ResponseFailed(response_id=rid, error=error, usage=usage))

    def _served_reasoning(self) -> pb.Reasoning:
        """The effort that served the response (auto's routed choice), its summary and budget."""
        h = self.first_handle
        effort = (h.effort if h is not None else None) or self.prepared.effort
        out = pb.Reasoning(effort=_EFFORT_ENUM.get(effort, pb.REASONING_EFFORT_UNSPECIFIED),
                           summary=_SUMMARY_ENUM[self.prepared.summary])
        if h is not None and h.reasoning_budget is not None:
            out.budget_tokens = h.reasoning_budget
        return out

    def _finish_record(self, status, reason: str, *, incomplete=None, error=None) -> None:
        rec, m = self.record, self.runner.metrics
        if rec.done:
            return
        rec.done = True
        r = rec.response
        r.status = status
        r.completed_at.CopyFrom(_now())
        r.usage.CopyFrom(usage_proto(self.usage))
        r.reasoning.CopyFrom(self._served_reasoning())
        if incomplete is not None:
            r.incomplete_details.reason = incomplete
        if error is not None:
            r.error.CopyFrom(error)
        if status != pb.RESPONSE_STATUS_COMPLETED:
            rec.pending_calls.clear()  # only a completed response's calls can be answered
        m.responses.labels(pb.ResponseStatus.Name(status).removeprefix("RESPONSE_STATUS_").lower()).inc()
        m.output_tokens.inc(self.usage.output_tokens)
        elapsed = time.perf_counter() - self.t0
        log.info("response finished", extra={"fields": {
            "response_id": r.id, "status": pb.ResponseStatus.Name(status), "reason": reason,
            "rounds": self.round + 1, "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens, "reasoning_tokens": self.usage.reasoning_tokens,
            "summary_tokens": self.summary_tokens,
            "seconds": round(elapsed, 4),
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.t0, 4)}})
        if not rec.stored:
            self.runner.records.pop(r.id)
            self.runner.forget(rec)
