"""Bad input: each case gets its exact gRPC status and message, and the server keeps serving."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from conftest import MODEL_ID, make_server, user
from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def fn_tool(parameters: str, name: str = "f") -> pb.Tool:
    return pb.Tool(function=pb.FunctionTool(name=name, parameters=parameters))


def schema_format(schema: str) -> pb.TextOptions:
    return pb.TextOptions(format=pb.TextFormat(json_schema=pb.JsonSchemaFormat(name="out", schema=schema)))


CASES = {
    "empty request": (pb.CreateRequest(), INVALID, "input is empty: give at least one message"),
    "empty item": (pb.CreateRequest(input=[pb.InputItem()]), INVALID,
                   "input[0] is empty: set message, function_call, function_call_output or reasoning"),
    "role not set": (pb.CreateRequest(input=[pb.InputItem(message=pb.InputMessage(
        content=[pb.InputContent(text="hi")]))]), INVALID,
        "input[0].message.role is not set (user, assistant, system or developer)"),
    "no content": (pb.CreateRequest(input=[pb.InputItem(message=pb.InputMessage(role=pb.ROLE_USER))]), INVALID,
                   "input[0].message.content is empty"),
    "blank text": (pb.CreateRequest(input=[user("   ")]), INVALID, "input[0].message has no text"),
    "image on a text model": (pb.CreateRequest(input=[pb.InputItem(message=pb.InputMessage(
        role=pb.ROLE_USER, content=[pb.InputContent(text="look"), pb.InputContent(image=pb.InputImage(
            data=b"\x89PNG", mime_type="image/png"))]))]), INVALID,
        "input[0].message.content[1].image: model 'kestrel-test' does not take images"),
    "unknown model": (pb.CreateRequest(model="gpt-9", input=[user("hi")]), NOT_FOUND,
                      "model 'gpt-9' is not served here; available: ['kestrel-test']"),
    "schema not JSON": (pb.CreateRequest(input=[user("hi")], text=schema_format("{not json")), INVALID,
                        "text.format.json_schema.schema is not valid JSON: Expecting property name enclosed in "
                        "double quotes: line 1 column 2 (char 1)"),
    "schema invalid": (pb.CreateRequest(input=[user("hi")], text=schema_format('{"type": "banana"}')), INVALID,
                       "text.format.json_schema.schema: malformed JSON schema at type: 'banana' is not valid "
                       "under any of the given schemas"),
    "schema unsupported keyword": (
        pb.CreateRequest(input=[user("hi")], text=schema_format(
            '{"type": "object", "properties": {"a": {"type": "string"}}, "dependentSchemas": {"a": {}}}')),
        INVALID, "text.format.json_schema.schema: JSON schema keywords not supported by the grammar backend: "
                 "dependentSchemas; remove them (they would not be enforced)"),
    "tool parameters unsupported": (
        pb.CreateRequest(input=[user("hi")], tools=[fn_tool(
            '{"type": "object", "properties": {"a": {"type": "string"}}, "dependentSchemas": {"a": {}}}')]),
        INVALID, "tools[0].function.parameters: JSON schema keywords not supported by the grammar backend: "
                 "dependentSchemas; remove them (they would not be enforced)"),
    "tool parameters not JSON": (pb.CreateRequest(input=[user("hi")], tools=[fn_tool("[")]), INVALID,
                                 "tools[0].function.parameters is not valid JSON: Expecting value: line 1 column 2 "
                                 "(char 1)"),
    "bad function name": (pb.CreateRequest(input=[user("hi")], tools=[fn_tool("", name="no spaces")]), INVALID,
                          "tools[0].function.name 'no spaces' must match [A-Za-z0-9_-]{1,64}"),
    "duplicate tool": (pb.CreateRequest(input=[user("hi")], tools=[
        pb.Tool(calculator=pb.CalculatorTool()), fn_tool("", name="calculator")]), INVALID,
        "tools[1]: a tool named 'calculator' is already among the tools"),
    "tool_choice unknown function": (pb.CreateRequest(input=[user("hi")], tools=[fn_tool("")],
                                                      tool_choice=pb.ToolChoice(function_name="g")), INVALID,
                                     "tool_choice.function_name 'g' is not among the tools ['f']"),
    "required without tools": (pb.CreateRequest(input=[user("hi")], tool_choice=pb.ToolChoice(
        mode=pb.ToolChoice.MODE_REQUIRED)), INVALID, "tool_choice.mode REQUIRED needs at least one tool"),
    "bad temperature": (pb.CreateRequest(input=[user("hi")], sampling=pb.SamplingOptions(temperature=-1)), INVALID,
                        "sampling.temperature must be in [0.0, inf], got -1.0"),
    "logprobs": (pb.CreateRequest(input=[user("hi")], sampling=pb.SamplingOptions(top_logprobs=3)), INVALID,
                 "sampling.top_logprobs needs sampling.logprobs"),
    "too many output tokens": (pb.CreateRequest(input=[user("hi")], max_output_tokens=100000), INVALID,
                               "max_output_tokens must be in [1, 256], got 100000"),
    "budget with effort none": (pb.CreateRequest(input=[user("hi")], reasoning=pb.Reasoning(
        effort=pb.REASONING_EFFORT_NONE, budget_tokens=5)), INVALID,
        "reasoning.budget_tokens was given but reasoning.effort is NONE"),
    "unknown previous_response_id": (pb.CreateRequest(input=[user("hi")], previous_response_id="resp_nope"),
                                     NOT_FOUND, "previous_response_id 'resp_nope' is unknown (never stored, deleted "
                                                "or evicted)"),
    "function output for unknown call_id": (
        pb.CreateRequest(input=[user("hi"), pb.InputItem(function_call_output=pb.FunctionCallOutput(
            call_id="call_x", output="1"))]), INVALID,
        "input[1].function_call_output.call_id 'call_x' matches no function call in the input"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_create_requests(stub, name):
    request, code, message = CASES[name]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Create(request, timeout=30))
    assert (info.value.code(), info.value.details()) == (code, message)


def test_function_output_for_unknown_call_of_previous_response(stub):
    first = list(stub.Create(pb.CreateRequest(input=[user("hi")], max_output_tokens=4), timeout=60))
    rid = first[0].created.response.id
    req = pb.CreateRequest(previous_response_id=rid, input=[pb.InputItem(
        function_call_output=pb.FunctionCallOutput(call_id="call_missing", output="x"))])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Create(req, timeout=30))
    assert info.value.code() == INVALID
    assert info.value.details() == (f"input[0].function_call_output.call_id 'call_missing' matches no function "
                                    f"call in the input or in previous response {rid!r}")
    # The server keeps serving after every refusal above.
    assert list(stub.Create(pb.CreateRequest(input=[user("hi")], max_output_tokens=2), timeout=60))[-1].HasField(
        "incomplete")


def test_get_cancel_unknown_ids(stub):
    for rpc in (stub.Get, stub.Cancel):
        with pytest.raises(grpc.RpcError) as info:
            rpc(pb.GetRequest(response_id="resp_x") if rpc is stub.Get else pb.CancelRequest(response_id="resp_x"),
                timeout=10)
        assert (info.value.code(), info.value.details()) == (
            NOT_FOUND, "response 'resp_x' is unknown (never stored, deleted or evicted)")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetBatch(pb.GetBatchRequest(batch_id="batch_x"), timeout=10)
    assert (info.value.code(), info.value.details()) == (NOT_FOUND, "batch 'batch_x' is unknown")


def test_api_keys(engine, caplog):
    key = "sk-test-0123456789abcdef"
    caplog.set_level(logging.DEBUG)
    with make_server(engine, api_keys=[key]) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KestrelStub(channel)
        req = pb.CreateRequest(input=[user("hi")], max_output_tokens=2)
        cases = [(None, "missing API key: send the header 'authorization: Bearer <key>'"),
                 ((("authorization", "Bearer sk-wrong"),), "invalid API key"),
                 ((("authorization", key),), "malformed authorization: expected 'Bearer <key>'")]
        for metadata, message in cases:
            for call in (lambda: list(stub.Create(req, timeout=30, metadata=metadata)),
                         lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        good = (("authorization", f"Bearer {key}"),)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=good).models[0].id == MODEL_ID
        assert list(stub.Create(req, timeout=60, metadata=good))[-1].HasField("incomplete")
    logged = "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
    assert "sk-" not in logged


def test_queue_full_is_resource_exhausted_with_retry_hint(engine):
    with make_server(engine, max_queued=1) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KestrelStub(channel)
        long = pb.CreateRequest(input=[user("digits")], max_output_tokens=256,
                                reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                                sampling=pb.SamplingOptions(temperature=0.2, seed=1))
        call = stub.Create(long, timeout=60)
        assert next(call).HasField("created")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Create(pb.CreateRequest(input=[user("hi")]), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "the server is at capacity (1 responses running or queued); retry after 1s"
        assert dict(info.value.trailing_metadata())["retry-after-ms"] == "1000"
        call.cancel()


def test_graceful_shutdown_finishes_or_cancels_open_streams(engine):
    server = make_server(engine)
    with server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.KestrelStub(channel)
            long = pb.CreateRequest(input=[user("digits")], max_output_tokens=256,
                                    reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                                    sampling=pb.SamplingOptions(temperature=0.2, seed=2))
            call = stub.Create(long, timeout=60)
            assert next(call).HasField("created")
            server.stop(grace=0.2)
            with pytest.raises(grpc.RpcError):
                for _ in call:
                    pass
            assert call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(pb.ListModelsRequest(), timeout=1)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    s = engine.stats()
    end = time.monotonic() + 10
    while (s.num_running or s.num_waiting) and time.monotonic() < end:
        time.sleep(0.05)
        s = engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0
