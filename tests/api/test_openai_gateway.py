"""The HTTP gateway, driven by the official ``openai`` package over a real localhost socket."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from conftest import MODEL_ID, make_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_base + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


def test_chat_stream_with_reasoning_content_tool_call_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", reasoning_effort="low", stream=True, stream_options={"include_usage": True},
        seed=1)
    reasoning, calls, finish, usage = [], {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        r = (delta.model_extra or {}).get("reasoning_content")
        if r:
            reasoning.append(r)
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert "".join(reasoning)  # reasoning streamed in its own field, before the call
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)
    assert usage.completion_tokens_details.reasoning_tokens == 6  # the test policy's low budget
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The client answers the call in the next request (history replayed, as Chat Completions does).
    follow = client.chat.completions.create(
        model=MODEL_ID, tools=[WEATHER], max_completion_tokens=8, seed=2, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": calls[0]["id"], "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert follow.usage.prompt_tokens > usage.prompt_tokens


def test_chat_non_streaming_json_schema(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "ok?"}], max_completion_tokens=40, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)
    assert out.choices[0].message.model_extra.get("reasoning_content")


def test_chat_logprobs_streamed_and_whole(client):
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Say hi."}], max_completion_tokens=10,
              temperature=0, logprobs=True, top_logprobs=2, reasoning_effort="none")
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert bytes(b for t in content for b in t.bytes).decode() == whole.choices[0].message.content
    streamed = [t for chunk in client.chat.completions.create(stream=True, **kw)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer 0..20"):
        client.chat.completions.create(**{**kw, "top_logprobs": 50})


def test_responses_stream_event_names(client):
    stream = client.responses.create(model=MODEL_ID, input="What is 1 + 1?", reasoning={"effort": "low"},
                                     max_output_tokens=40, stream=True)
    events = list(stream)
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    for t in ("response.in_progress", "response.output_item.added", "response.reasoning_text.delta",
              "response.reasoning_text.done", "response.output_item.done"):
        assert t in types, t
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    got = client.responses.retrieve(final.id)
    assert got.status == final.status
    assert got.usage.output_tokens == final.usage.output_tokens
    assert got.usage.output_tokens_details.reasoning_tokens == 6
    assert got.reasoning.effort == "low" and got.reasoning.summary is None  # what served it
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == got.output_text


def test_responses_previous_response_id_and_errors(client):
    first = client.responses.create(model=MODEL_ID, input="hi", max_output_tokens=6)
    second = client.responses.create(model=MODEL_ID, input="more", previous_response_id=first.id,
                                     max_output_tokens=6)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="gpt-9", input="hi")
    assert info.value.body["message"] == "model 'gpt-9' is not served here; available: ['kestrel-test']"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[])
    assert info.value.body["message"] == "messages must be a non-empty list"


def test_metrics_and_keys_over_http(engine):
    with make_server(engine, api_keys=["k1"]) as server:
        bad = openai.OpenAI(base_url=server.http_base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.body["message"] == "invalid API key"
        good = openai.OpenAI(base_url=server.http_base + "/v1", api_key="k1", max_retries=0, timeout=60)
        good.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                     max_completion_tokens=4)
        text = urllib.request.urlopen(server.http_base + "/metrics", timeout=10).read().decode()
    for name in ("kestrel_time_to_first_token_seconds_count", "kestrel_inter_token_latency_seconds_count",
                 "kestrel_queue_depth", "kestrel_running_requests", "kestrel_kv_pages_in_use",
                 "kestrel_prefix_cache_hit_rate", "kestrel_output_tokens_per_second"):
        assert name in text, name
    ttft = next(line for line in text.splitlines() if line.startswith("kestrel_time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) >= 1
