"""A response says the effort that served it: for AUTO, the effort the server's router chose."""

from __future__ import annotations

import numpy as np

from conftest import MODEL_ID, user
from protos.kestrel.v1 import kestrel_pb2 as pb
from serve.effort import EffortModel, fit_router


def _router():
    """Sums are right at every effort, conversions only at high (low spends 20 tokens, high 100)."""
    rng = np.random.default_rng(0)
    texts, kinds = [], []
    for i in range(40):
        a, b = rng.integers(1, 10_000, 2)
        texts.append(f"Convert {a} inches to metres." if i % 2 else f"What is {a} + {b}?")
        kinds.append(i % 2)
    kinds = np.array(kinds, float)
    correct = {"low": 1 - kinds, "medium": 1 - kinds, "high": np.ones(len(texts))}
    tokens = {"low": np.full(len(texts), 20.0), "medium": np.full(len(texts), 60.0),
              "high": np.full(len(texts), 100.0)}
    return fit_router(texts, correct, tokens, l2=0.1, tolerance=0.1)


def _served(stub, text: str, effort=pb.REASONING_EFFORT_AUTO) -> pb.Reasoning:
    req = pb.CreateRequest(model=MODEL_ID, input=[user(text)], reasoning=pb.Reasoning(effort=effort),
                           max_output_tokens=30, sampling=pb.SamplingOptions(seed=3))
    events = list(stub.Create(req, timeout=60))
    assert events[-1].WhichOneof("event") in ("completed", "incomplete")
    return stub.Get(pb.GetRequest(response_id=events[0].created.response.id), timeout=10).reasoning


def test_auto_response_names_the_routed_effort(stub, engine):
    saved = engine.effort
    # The server's policy table (6/8/12 tokens) sets the budgets of asked efforts; a routed one
    # takes the engine's table, here the router's own.
    engine.effort = EffortModel({"low": 5, "medium": 7, "high": 9}, router=_router())
    try:
        assert _served(stub, "What is 7321 + 55?") == pb.Reasoning(
            effort=pb.REASONING_EFFORT_LOW, summary=pb.REASONING_SUMMARY_NONE, budget_tokens=5)
        assert _served(stub, "Convert 812 inches to metres.") == pb.Reasoning(
            effort=pb.REASONING_EFFORT_HIGH, summary=pb.REASONING_SUMMARY_NONE, budget_tokens=9)
        # An asked effort is echoed as asked; NONE has no budget.
        assert _served(stub, "What is 1 + 2?", pb.REASONING_EFFORT_MEDIUM).effort == pb.REASONING_EFFORT_MEDIUM
        off = _served(stub, "What is 1 + 2?", pb.REASONING_EFFORT_NONE)
        assert off.effort == pb.REASONING_EFFORT_NONE and not off.HasField("budget_tokens")
    finally:
        engine.effort = saved
