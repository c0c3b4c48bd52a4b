"""The Python client (sync and async faces) and ``kestrel chat`` against a real localhost server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json

import pytest

from conftest import MODEL_ID
from kestrel.errors import KestrelError
from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.chat_cli import add_chat_arguments, add_serve_arguments, build_server, chat_main
from serve.client import AsyncClient, Client, build_request, function_tool


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Weather of a city."""
    return {"city": city, "temp": 21, "unit": unit}


def test_function_tool_schema_from_type_hints():
    tool = function_tool(get_weather)
    assert tool.function.name == "get_weather" and tool.function.description == "Weather of a city."
    assert json.loads(tool.function.parameters) == {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"], "additionalProperties": False}
    with pytest.raises(ValueError, match="parameter 'x' needs a type hint"):
        function_tool(lambda x: x)


def test_sync_client_runs_local_functions(server):
    with Client(server.target, timeout=60) as client:
        assert [m.id for m in client.list_models()] == [MODEL_ID]
        req = build_request("Weather in Paris?", tools=[function_tool(get_weather)], tool_choice="get_weather",
                            effort="none", max_output_tokens=64, seed=1)
        seen = []
        final = client.run_with_functions(req, {"get_weather": get_weather}, on_event=seen.append)
        kinds = [e.WhichOneof("event") for e in seen]
        assert kinds.count("created") == 2  # the call, then the turn that read its result
        assert final.previous_response_id and final.status in (pb.RESPONSE_STATUS_COMPLETED,
                                                               pb.RESPONSE_STATUS_INCOMPLETE)
        first = client.get(final.previous_response_id)
        assert first.output[-1].function_call.name == "get_weather"
        assert client.count_tokens(build_request("hi")) > 0
        assert client.delete(final.id)


def test_async_client_streams_and_cancels(server):
    async def main():
        async with AsyncClient(server.target, timeout=60) as client:
            response = await client.create("hi", effort="low", max_output_tokens=12, seed=2)
            assert response.status in (pb.RESPONSE_STATUS_COMPLETED, pb.RESPONSE_STATUS_INCOMPLETE)
            assert (await client.get(response.id)).usage == response.usage
            # Leaving the stream early cancels the response on the server.
            rid = None
            async for e in client.stream("digits", effort="none", max_output_tokens=256, temperature=0.2, seed=3):
                if e.HasField("created"):
                    rid = e.created.response.id
                if e.HasField("output_text_delta"):
                    break
            for _ in range(100):
                got = await client.get(rid)
                if got.status != pb.RESPONSE_STATUS_IN_PROGRESS:
                    break
                await asyncio.sleep(0.05)
            assert got.status == pb.RESPONSE_STATUS_CANCELLED

    asyncio.run(main())


def test_chat_cli_shows_reasoning_calls_and_runs_local_functions(server, tmp_path):
    tools_file = tmp_path / "my_tools.py"
    tools_file.write_text("def get_weather(city: str) -> str:\n    return 'sunny in ' + city\n")
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    args = parser.parse_args(["Weather?", "--server", server.target, "--function", f"{tools_file}:get_weather",
                              "--tool-choice", "get_weather", "--effort", "low", "--summary", "concise",
                              "--timeout", "60"])
    out = io.StringIO()
    chat_main(args, out=out)
    text = out.getvalue()
    assert "[reasoning]" in text and "[summary]" in text
    assert "[call] get_weather({" in text
    assert "[local result] get_weather: sunny in " in text
    assert "\x1b[" not in text  # not a terminal: no colour codes
    # The last line names the response and its usage; a follow-up continues it from the cache.
    last = text.strip().splitlines()[-1]
    rid = last.split("]")[0].lstrip("[")
    assert rid.startswith("resp_") and " cached), reasoning " in last
    follow = parser.parse_args(["And tomorrow?", "--server", server.target, "--previous-response-id", rid,
                                "--effort", "none", "--max-output-tokens", "8", "--temperature", "0"])
    out = io.StringIO()
    chat_main(follow, out=out)
    cached = int(out.getvalue().strip().splitlines()[-1].split("(")[1].split()[0])
    assert cached > 0

    bad = parser.parse_args(["hi", "--server", server.target, "--function", "nofile.py:f"])
    with pytest.raises(KestrelError, match="--function: file 'nofile.py' does not exist"):
        chat_main(bad, out=io.StringIO())
    unknown = parser.parse_args(["hi", "--server", server.target, "--model", "nope"])
    with pytest.raises(KestrelError, match="NOT_FOUND: model 'nope' is not served here"):
        chat_main(unknown, out=io.StringIO())


def test_serve_arguments_and_checks(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([])
    assert (args.ckpt, args.host, args.port, args.http_port) == ("checkpoints/kestrel-nano", "127.0.0.1", 50051, 8000)
    with pytest.raises(KestrelError, match="checkpoint folder 'nowhere' does not exist"):
        build_server(parser.parse_args(["nowhere"]))
    with pytest.raises(KestrelError, match="give both --tls-cert and --tls-key"):
        build_server(parser.parse_args([str(tmp_path), "--tls-cert", "c.pem"]))
    with pytest.raises(KestrelError, match="API key file 'missing.txt' cannot be read"):
        build_server(parser.parse_args([str(tmp_path), "--api-keys-file", "missing.txt"]))
    assert args.early_exit_threshold is None  # early exit is off by default
    with pytest.raises(KestrelError, match=r"--early-exit-threshold must be in \[0, 1\], got 1.5"):
        build_server(parser.parse_args([str(tmp_path), "--early-exit-threshold", "1.5"]))


def test_equal_local_results_of_two_calls_print_on_their_own_lines():
    import io

    from serve.chat_cli import _Printer

    out = io.StringIO()
    printer = _Printer(out, color=False)
    printer.local_result("call_1", "reserve_train_seat", '{"result": "TRA-1"}')
    printer.local_result("call_2", "reserve_train_seat", '{"result": "TRA-1"}')
    printer.end()
    assert out.getvalue().splitlines() == ['[local result] reserve_train_seat: {"result": "TRA-1"}'] * 2
