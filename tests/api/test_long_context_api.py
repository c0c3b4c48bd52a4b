"""Long-context limits through the API: 100K output budgets are accepted where the context allows
them, and a client's prompt plus max_output_tokens beyond the context fails before queueing."""

from __future__ import annotations

import grpc
import pytest

from conftest import user
from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.api.convert import ModelInfo, Policy, prepare
from serve.api.openai_schema import chat_request, responses_request
from serve.api.records import RecordStore


def test_max_output_tokens_of_100000_pass_grpc_and_http_validation():
    model = ModelInfo(id="long", context_length=200_000, max_output_tokens=100_000)
    p = prepare(pb.CreateRequest(input=[user("hi")], max_output_tokens=100_000), model=model,
                records=RecordStore(4), policy=Policy())
    assert (p.params.max_tokens, p.explicit_max_tokens) == (100_000, True)
    default = prepare(pb.CreateRequest(input=[user("hi")]), model=model, records=RecordStore(4), policy=Policy())
    assert (default.params.max_tokens, default.explicit_max_tokens) == (100_000, False)
    req, _ = responses_request({"model": "long", "input": "hi", "max_output_tokens": 100_000})
    assert req.max_output_tokens == 100_000
    req, _, _ = chat_request({"model": "long", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 100_000})
    assert req.max_output_tokens == 100_000


def test_prompt_plus_max_output_tokens_beyond_the_context_is_invalid(stub, engine):
    # ~900 prompt tokens + 256 asked > the test model's 1,024-token context.
    request = pb.CreateRequest(input=[user("digits " * 150)], max_output_tokens=256,
                               reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Create(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the model's context is 1,024 tokens, but the prompt has" in info.value.details()
    assert "max_tokens asks for 256 more" in info.value.details()
    assert not engine.scheduler.has_unfinished()
