"""The tool-validity benchmark's cases: enforceable complex schemas, an expected call that the
shared scorer accepts, and tools shown to a model whose chat template drops them."""

import jsonschema

from bench.tool_validity import make_case, score, summarize, tools_system_message
from serve.grammar import FunctionTool, check_schema, tool_call_schema


def _schema_kinds(schema, found):
    found.add(schema.get("type", "enum"))
    if "minimum" in schema or "exclusiveMinimum" in schema:
        found.add("bounded")
    if schema.get("required"):
        found.add("required")
    for child in schema.get("properties", {}).values():
        _schema_kinds(child, found)
    if "items" in schema:
        _schema_kinds(schema["items"], found)
    return found


def test_cases_are_complex_enforceable_and_their_expected_call_scores_valid():
    cases = [make_case(i, seed=0) for i in range(12)]
    kinds = set()
    for case in cases:
        fns = [FunctionTool(t["function"]["name"], t["function"]["parameters"]) for t in case.tools]
        check_schema(tool_call_schema(fns), where="call")  # the constrained SmolLM2 run's format
        expected = case.meta["calls"][0]
        schema = next(t["function"]["parameters"] for t in case.tools if t["function"]["name"] == expected["name"])
        jsonschema.validate(expected["arguments"], schema)
        assert all(k in case.messages[0]["content"] for k in expected["arguments"])
        row = score(case, [expected], ended=True)
        assert row["valid"] and row["exact_match"]
        for t in case.tools:
            _schema_kinds(t["function"]["parameters"], kinds)
    assert {"object", "array", "enum", "integer", "number", "boolean", "string", "bounded", "required"} <= kinds
    assert make_case(3, seed=0).tools == make_case(3, seed=0).tools  # seeded: reproducible
    assert make_case(3, seed=0).tools != make_case(3, seed=1).tools


def test_wrong_calls_and_missing_calls_count_as_invalid():
    case = make_case(0, seed=0)
    expected = case.meta["calls"][0]
    rows = [score(case, [], ended=True),  # no call at all
            score(case, [None], ended=True),  # a call that does not parse
            score(case, [{"name": "not_offered", "arguments": {}}], ended=True),
            score(case, [{"name": expected["name"], "arguments": {"zzz": 1}}], ended=True),
            score(case, [expected], ended=True)]
    assert [r["valid"] for r in rows] == [False, False, False, False, True]
    assert [r["parses"] for r in rows] == [False, False, True, True, True]
    assert [r["names_offered"] for r in rows] == [False, False, False, True, True]
    assert [r["schema_valid"] for r in rows] == [False, False, False, False, True]
    summary = summarize(rows)
    assert summary["invalid_rate"] == 0.8 and summary["invalid_rate_among_calls"] == 0.75


def test_tools_system_message_holds_every_function_schema():
    case = make_case(1, seed=0)
    message = tools_system_message(case.tools)
    assert message["role"] == "system" and "<tool_call>" in message["content"]
    assert "<|im_start|>" not in message["content"] and "<|im_end|>" not in message["content"]
    for t in case.tools:
        assert t["function"]["name"] in message["content"]
