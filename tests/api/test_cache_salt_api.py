"""``cache_salt`` through the API (vLLM's field): requests reuse cached prompt pages only under
the same salt; both HTTP bodies carry it, and a bad one is refused before anything is queued."""

from __future__ import annotations

import pytest

from conftest import MODEL_ID, user
from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.convert import ModelInfo, Policy, prepare
from serve.api.errors import ApiError
from serve.api.openai_schema import chat_request, responses_request
from serve.api.records import RecordStore

PROMPT = "Tell me about the moon and its phases, the tides and eclipses. " * 6


def cached_tokens(stub, salt: str) -> int:
    req = pb.CreateRequest(model=MODEL_ID, input=[user(PROMPT)], cache_salt=salt, store=False,
                           max_output_tokens=2, reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE))
    last = list(stub.Create(req, timeout=60))[-1]
    end = last.WhichOneof("event")  # completed, or incomplete when the 2 tokens ran out first
    assert end in ("completed", "incomplete"), last
    return getattr(last, end).usage.cached_input_tokens


def test_prompt_pages_are_shared_only_under_the_same_salt(stub, engine):
    assert cached_tokens(stub, "tenant-a") == 0
    assert cached_tokens(stub, "tenant-b") == 0  # the same prompt, another tenant: no reuse
    assert cached_tokens(stub, "tenant-a") > 0
    assert cached_tokens(stub, "") == 0  # unsalted requests share only among themselves
    assert not engine.scheduler.has_unfinished()


def test_http_bodies_carry_the_salt_and_bad_salts_are_refused():
    req, _, _ = chat_request({"messages": [{"role": "user", "content": "hi"}], "cache_salt": "t1"})
    assert req.cache_salt == "t1"
    req, _ = responses_request({"input": "hi", "cache_salt": "t2"})
    assert req.cache_salt == "t2"
    for bad in (7, "", ["t"]):
        with pytest.raises(ApiError, match="cache_salt must be a non-empty string"):
            chat_request({"messages": [{"role": "user", "content": "hi"}], "cache_salt": bad})
    model = ModelInfo(id="m", context_length=1024, max_output_tokens=256)
    p = prepare(pb.CreateRequest(input=[user("hi")], cache_salt="t3"), model=model,
                records=RecordStore(4), policy=Policy())
    assert p.cache_salt == "t3"
    with pytest.raises(ApiError, match="cache_salt has 300 characters; at most 256"):
        prepare(pb.CreateRequest(input=[user("hi")], cache_salt="x" * 300), model=model,
                records=RecordStore(4), policy=Policy())
