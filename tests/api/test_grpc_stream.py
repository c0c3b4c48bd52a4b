"""End-to-end: a real server on 127.0.0.1, the generated stub, every RPC and every event type."""

from __future__ import annotations

import json
import threading
import time

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import MODEL_ID, user
from protos.kestrel.v1 import kestrel_pb2 as pb
from serve import events as ev
from serve.engine import EngineRequest
from serve.summaries import summary_request_fields
from serve.tool_loop import run_builtin
from serve.tools.calculator import calculate

WEATHER = pb.Tool(function=pb.FunctionTool(
    name="get_weather", description="Weather of a city.",
    parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})))


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def check_sequence(events) -> None:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds(events)[0] == "created"
    terminal = [k for k in kinds(events) if k in ("completed", "incomplete", "failed")]
    assert terminal == [kinds(events)[-1]]


def test_reasoning_summary_and_answer_stream(stub, engine):
    req = pb.CreateRequest(model=MODEL_ID, input=[user("What is 2 + 2?")],
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_LOW, summary=pb.REASONING_SUMMARY_AUTO),
                           sampling=pb.SamplingOptions(seed=1))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    k = kinds(events)
    for kind in ("in_progress", "output_item_added", "reasoning_text_delta", "reasoning_text_done",
                 "reasoning_summary_text_delta", "reasoning_summary_text_done", "output_text_delta",
                 "output_text_done", "output_item_done", "completed"):
        assert kind in k, kind
    assert k.index("reasoning_text_done") < k.index("output_text_delta")
    reasoning = "".join(e.reasoning_text_delta.delta for e in events if e.HasField("reasoning_text_delta"))
    assert reasoning == next(e.reasoning_text_done.text for e in events if e.HasField("reasoning_text_done"))
    answer = "".join(e.output_text_delta.delta for e in events if e.HasField("output_text_delta"))
    assert answer == next(e.output_text_done.text for e in events if e.HasField("output_text_done"))
    usage = events[-1].completed.usage
    # The low effort's budget (6 tokens in the test policy) bounds the reasoning; the budget ran out.
    assert usage.reasoning_tokens == 6
    assert usage.output_tokens == usage.reasoning_tokens + usage.answer_tokens + usage.tool_call_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    rid = events[0].created.response.id
    stored = stub.Get(pb.GetRequest(response_id=rid), timeout=10)
    assert stored.status == pb.RESPONSE_STATUS_COMPLETED
    assert stored.usage == usage
    assert stored.reasoning == pb.Reasoning(effort=pb.REASONING_EFFORT_LOW, summary=pb.REASONING_SUMMARY_AUTO,
                                            budget_tokens=6)
    assert [i.WhichOneof("item") for i in stored.output] == ["reasoning", "message"]
    assert stored.output[0].reasoning.content[0].text == reasoning
    assert stored.output[0].reasoning.budget_exhausted
    # The summary is the served model's own pass over the reasoning (serve/summaries.py).
    summary = "".join(e.reasoning_summary_text_delta.delta for e in events
                      if e.HasField("reasoning_summary_text_delta"))
    again = engine.submit(EngineRequest(**summary_request_fields(reasoning, "auto")))
    assert summary == "".join(e.text for e in again if isinstance(e, ev.AnswerDelta))
    assert stored.output[0].reasoning.summary[0].text == summary
    assert stored.output[1].message.content[0].text == answer


def test_builtin_calculator_runs_inside_the_response(stub):
    req = pb.CreateRequest(input=[user("What is 1 + 2?")], tools=[pb.Tool(calculator=pb.CalculatorTool())],
                           tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
                           sampling=pb.SamplingOptions(seed=3))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    k = kinds(events)
    assert "function_call_arguments_delta" in k and "function_call_arguments_done" in k
    started = next(e.tool_execution_started for e in events if e.HasField("tool_execution_started"))
    finished = next(e.tool_execution_finished for e in events if e.HasField("tool_execution_finished"))
    assert started.name == finished.name == "calculator" and started.call_id == finished.call_id
    expression = json.loads(started.arguments)["expression"]
    try:
        expected, is_error = calculate(expression), False
    except ValueError as e:
        expected, is_error = f"error: {e}", True
    assert (finished.output, finished.is_error) == (expected, is_error)
    # The response went on after the tool: a second round generated more output after the result.
    after = k[k.index("tool_execution_finished"):]
    assert any(x in after for x in ("reasoning_text_delta", "output_text_delta", "function_call_arguments_delta"))
    response = stub.Get(pb.GetRequest(response_id=events[0].created.response.id), timeout=10)
    calls = [i.builtin_tool_call for i in response.output if i.HasField("builtin_tool_call")]
    assert calls[0].output == expected and calls[0].arguments == started.arguments


def test_client_function_call_then_output_continues(stub):
    req = pb.CreateRequest(input=[user("Weather in Paris?")], tools=[WEATHER],
                           tool_choice=pb.ToolChoice(function_name="get_weather"),
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE), sampling=pb.SamplingOptions(seed=4))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    assert kinds(events)[-1] == "completed"
    done = next(e.function_call_arguments_done for e in events if e.HasField("function_call_arguments_done"))
    assert done.name == "get_weather"
    assert isinstance(json.loads(done.arguments)["city"], str)
    deltas = "".join(e.function_call_arguments_delta.delta for e in events if e.HasField("function_call_arguments_delta"))
    assert deltas == done.arguments
    assert "tool_execution_started" not in kinds(events)  # client functions are not run by the server

    follow = pb.CreateRequest(
        previous_response_id=events[0].created.response.id, tools=[WEATHER],
        input=[pb.InputItem(function_call_output=pb.FunctionCallOutput(call_id=done.call_id, output='{"temp": 21}'))],
        max_output_tokens=12, sampling=pb.SamplingOptions(seed=5))
    events2 = list(stub.Create(follow, timeout=60))
    check_sequence(events2)
    assert kinds(events2)[-1] in ("completed", "incomplete")
    assert events2[0].created.response.previous_response_id == events[0].created.response.id
    # The continuation's prompt holds the whole first turn: more input tokens than the first had.
    first_in = events[-1].completed.usage.input_tokens
    last = events2[-1]
    usage = last.completed.usage if last.HasField("completed") else last.incomplete.usage
    assert usage.input_tokens > first_in


def test_max_output_tokens_ends_incomplete(stub):
    req = pb.CreateRequest(input=[user("Count")], max_output_tokens=3,
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_HIGH))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    assert events[-1].incomplete.reason == pb.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS
    assert events[-1].incomplete.usage.output_tokens == 3


def test_json_schema_answer_is_valid(stub):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    req = pb.CreateRequest(input=[user("Give n")], max_output_tokens=48, sampling=pb.SamplingOptions(seed=6),
                           text=pb.TextOptions(format=pb.TextFormat(json_schema=pb.JsonSchemaFormat(
                               name="n", schema=json.dumps(schema)))))
    events = list(stub.Create(req, timeout=60))
    assert kinds(events)[-1] == "completed"
    text = next(e.output_text_done.text for e in events if e.HasField("output_text_done"))
    jsonschema.validate(json.loads(text), schema)


def test_stop_string_cuts_the_answer(stub):
    req = pb.CreateRequest(input=[user("Digits")], max_output_tokens=40,
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                           sampling=pb.SamplingOptions(temperature=0.3, seed=7, stop=["1"]))
    events = list(stub.Create(req, timeout=60))
    assert kinds(events)[-1] == "completed"
    answer = "".join(e.output_text_delta.delta for e in events if e.HasField("output_text_delta"))
    assert "1" not in answer


def long_request(seed: int = 0) -> pb.CreateRequest:
    # Low temperature makes the end-of-turn token rare next to the digits: a long answer.
    return pb.CreateRequest(input=[user("Write many digits")], max_output_tokens=256,
                            reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                            sampling=pb.SamplingOptions(temperature=0.2, seed=seed))


def wait_idle(engine, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_cancellation_mid_stream_cancels_the_engine_request(stub, server, engine):
    call = stub.Create(long_request(8), timeout=60)
    rid = None
    deltas = 0
    for e in call:
        if e.HasField("created"):
            rid = e.created.response.id
        if e.HasField("output_text_delta"):
            deltas += 1
            if deltas == 3:
                call.cancel()
                break
    assert call.code() == grpc.StatusCode.CANCELLED
    assert wait_idle(engine)
    stored = stub.Get(pb.GetRequest(response_id=rid), timeout=10)
    assert stored.status == pb.RESPONSE_STATUS_CANCELLED
    assert stored.usage.output_tokens < 256
    # Other clients are still served.
    assert kinds(stub.Create(pb.CreateRequest(input=[user("hi")], max_output_tokens=4), timeout=60))[-1] in (
        "completed", "incomplete")


def test_cancel_rpc_ends_the_stream_incomplete(stub, engine):
    events = []
    call = stub.Create(long_request(9), timeout=60)
    first_delta = threading.Event()

    def consume():
        for e in call:
            events.append(e)
            if e.HasField("output_text_delta"):
                first_delta.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first_delta.wait(30)
    rid = events[0].created.response.id
    stub.Cancel(pb.CancelRequest(response_id=rid), timeout=10)
    t.join(30)
    assert events[-1].incomplete.reason == pb.INCOMPLETE_REASON_CANCELLED
    assert stub.Get(pb.GetRequest(response_id=rid), timeout=10).status == pb.RESPONSE_STATUS_CANCELLED
    # Cancelling a finished response changes nothing.
    assert stub.Cancel(pb.CancelRequest(response_id=rid), timeout=10).status == pb.RESPONSE_STATUS_CANCELLED


def test_deadline_expires_mid_stream(stub, engine):
    call = stub.Create(long_request(10), timeout=1.0)
    events = []
    with pytest.raises(grpc.RpcError) as info:
        for e in call:
            events.append(e)
            time.sleep(0.05)  # a slow reader: the deadline passes mid-stream
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert events and events[0].HasField("created")
    assert wait_idle(engine)
    stored = stub.Get(pb.GetRequest(response_id=events[0].created.response.id), timeout=10)
    assert stored.status in (pb.RESPONSE_STATUS_CANCELLED, pb.RESPONSE_STATUS_INCOMPLETE)


def test_list_models_count_tokens_and_delete(stub):
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [(m.id, m.is_default) for m in models] == [(MODEL_ID, True)]
    assert models[0].context_length == 1024 and models[0].max_output_tokens == 256

    req = pb.CreateRequest(input=[user("How many tokens is this?")], tools=[WEATHER], max_output_tokens=2)
    counted = stub.CountTokens(pb.CountTokensRequest(request=req), timeout=10)
    events = list(stub.Create(req, timeout=60))
    usage = events[-1].incomplete.usage if events[-1].HasField("incomplete") else events[-1].completed.usage
    assert counted.input_tokens == usage.input_tokens
    assert counted.context_length == 1024

    rid = events[0].created.response.id
    assert stub.Delete(pb.DeleteRequest(response_id=rid), timeout=10).deleted
    assert not stub.Delete(pb.DeleteRequest(response_id=rid), timeout=10).deleted
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(response_id=rid), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_batch_runs_every_line(stub):
    lines = [pb.BatchRequestItem(custom_id=f"line-{i}", request=pb.CreateRequest(
        input=[user(f"Question {i}")], max_output_tokens=4)) for i in range(3)]
    batch = stub.CreateBatch(pb.CreateBatchRequest(requests=lines, metadata={"k": "v"}), timeout=10)
    assert batch.id.startswith("batch_") and batch.request_counts.total == 3
    end = time.monotonic() + 60
    while batch.status not in (pb.BATCH_STATUS_COMPLETED, pb.BATCH_STATUS_FAILED) and time.monotonic() < end:
        time.sleep(0.2)
        batch = stub.GetBatch(pb.GetBatchRequest(batch_id=batch.id), timeout=10)
    assert batch.status == pb.BATCH_STATUS_COMPLETED
    assert [r.custom_id for r in batch.results] == ["line-0", "line-1", "line-2"]
    assert all(r.response.usage.output_tokens >= 1 for r in batch.results)
    assert batch.request_counts.completed == 3 and batch.metadata["k"] == "v"

    bad = stub.CreateBatch(pb.CreateBatchRequest(requests=[pb.BatchRequestItem(
        custom_id="x", request=pb.CreateRequest(model="nope", input=[user("hi")]))]), timeout=10)
    assert bad.status == pb.BATCH_STATUS_FAILED
    assert bad.error.message == "requests[0]: model 'nope' is not served here; available: ['kestrel-test']"

    long = stub.CreateBatch(pb.CreateBatchRequest(requests=[pb.BatchRequestItem(
        custom_id="long", request=long_request(11))]), timeout=10)
    cancelled = stub.CancelBatch(pb.CancelBatchRequest(batch_id=long.id), timeout=10)
    assert cancelled.status in (pb.BATCH_STATUS_CANCELLING, pb.BATCH_STATUS_CANCELLED)
    end = time.monotonic() + 30
    while cancelled.status != pb.BATCH_STATUS_CANCELLED and time.monotonic() < end:
        time.sleep(0.1)
        cancelled = stub.GetBatch(pb.GetBatchRequest(batch_id=long.id), timeout=10)
    assert cancelled.status == pb.BATCH_STATUS_CANCELLED


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="kestrel.v1.Kestrel"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"kestrel.v1.Kestrel", "grpc.health.v1.Health"} <= names


def test_builtin_python_runs_in_the_sandbox(stub):
    req = pb.CreateRequest(input=[user("Compute with python")], tools=[pb.Tool(python=pb.PythonTool(timeout_seconds=3))],
                           tool_choice=pb.ToolChoice(function_name="python"), max_output_tokens=96,
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE), sampling=pb.SamplingOptions(seed=12))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    started = next(e.tool_execution_started for e in events if e.HasField("tool_execution_started"))
    finished = next(e.tool_execution_finished for e in events if e.HasField("tool_execution_finished"))
    expected = run_builtin("python", started.arguments, python_timeout_s=3)
    assert (finished.output, finished.is_error) == (expected.output, expected.is_error)
    assert finished.duration.ToTimedelta().total_seconds() > 0


def test_answer_deltas_carry_log_probabilities(stub, engine):
    req = pb.CreateRequest(model=MODEL_ID, input=[user("Say something.")], max_output_tokens=12,
                           reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                           sampling=pb.SamplingOptions(temperature=0.0, logprobs=True, top_logprobs=3))
    events = list(stub.Create(req, timeout=60))
    check_sequence(events)
    deltas = [e.output_text_delta for e in events if e.HasField("output_text_delta")]
    assert deltas
    records = [r for d in deltas for r in d.logprobs]
    spell = engine.tokenizer.token_bytes()
    # The model's own distribution (before masks and penalties, as vLLM reports by default): the
    # channel machine's mask may have ruled out its favourite, so the sampled token is not always
    # the top alternative; the records' bytes spell the answer text.
    for r in records:
        tops = [t.logprob for t in r.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and r.logprob <= tops[0] + 1e-6
        assert r.bytes == spell[r.token_id]
    answer = "".join(d.delta for d in deltas)
    assert b"".join(r.bytes for r in records).decode() == answer
    stored = stub.Get(pb.GetRequest(response_id=events[0].created.response.id), timeout=10)
    assert list(stored.output[-1].message.content[0].logprobs) == records
