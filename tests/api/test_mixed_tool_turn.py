"""A turn with parallel calls of a built-in tool and a client function: the server runs the
built-in one, the response ends with the client's call, and the continuation gives the model both
results."""

from __future__ import annotations

import json

import grpc
import pytest

from conftest import POLICY, user
from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from serve.api.server import KestrelServer
from serve.engine import Engine
from server_thread import ServerThread
from tiny_model import PREFERENCES, build_model

WEATHER = pb.Tool(function=pb.FunctionTool(name="get_weather", parameters=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})))


@pytest.mark.slow  # its own engine (a model that likes parallel calls) compiles its own steps
def test_builtin_and_client_calls_in_one_turn(tokenizer):
    prefs = dict(PREFERENCES, **{"<tool_call>": 1.5})
    engine = Engine(build_model(tokenizer, prefs), tokenizer, num_pages=128, page_size=16, max_num_seqs=4,
                    max_num_batched_tokens=256, prefill_chunk_size=32)
    engine.runner.min_table_pages = 64
    with ServerThread(KestrelServer(engine, model_id="m", policy=POLICY, max_output_tokens=256)) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KestrelStub(channel)
        for seed in range(20):
            req = pb.CreateRequest(input=[user("Weather and 1+1?")], tools=[pb.Tool(calculator=pb.CalculatorTool()),
                                                                            WEATHER],
                                   tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
                                   reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_LOW), max_output_tokens=120,
                                   sampling=pb.SamplingOptions(seed=seed))
            events = list(stub.Create(req, timeout=120))
            done = [e.function_call_arguments_done for e in events if e.HasField("function_call_arguments_done")]
            names = {d.name for d in done}
            if events[-1].HasField("completed") and names == {"calculator", "get_weather"}:
                break
        else:
            pytest.fail("no seed gave a turn with both calls")
        finished = [e.tool_execution_finished for e in events if e.HasField("tool_execution_finished")]
        assert {f.name for f in finished} == {"calculator"}  # the server ran only the built-in calls
        rid = events[0].created.response.id
        client_calls = [d for d in done if d.name == "get_weather"]
        outputs = [pb.InputItem(function_call_output=pb.FunctionCallOutput(call_id=c.call_id, output="sunny"))
                   for c in client_calls]
        # No tools in the follow-up: with them, the engine's continuation re-renders the whole tool
        # header when the earlier turn had no reasoning (reported to the engine's owner).
        follow = list(stub.Create(pb.CreateRequest(previous_response_id=rid, input=outputs, max_output_tokens=4),
                                timeout=120))
        assert follow[-1].WhichOneof("event") in ("completed", "incomplete")
        stored = engine.get_response(follow[0].created.response.id)
        tool_messages = [m["content"] for m in stored.messages if m["role"] == "tool"]
        assert tool_messages[:len(finished)] == [f.output for f in finished]
        assert tool_messages[len(finished):] == ["sunny"] * len(client_calls)
    engine.stop()
