"""Scoring a model's output against an example: final answers and tool calls.

`check_answer` reads the final answer (the last ``Answer:`` line, else the whole text after any
``</think>``) and compares it by kind: numbers within the task's relative tolerance, converting an
answer written in another unit of the same dimension; equations variable by variable; function
results by the result codes they must mention; refusals by saying so without calling.
`check_tool_calls` parses calls (text with ``<tool_call>`` blocks or dicts), validates them against
the offered schemas with jsonschema and compares them with the expected calls.
"""

import functools
import json
import re
from collections import Counter
from fractions import Fraction
from typing import Any

import jsonschema

from train.synthetic.example import Example
from train.synthetic.quantities import convert, dimension, find_quantities, parse_number

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_EQUATION = re.compile(r"([A-Za-z]\w*)\s*=\s*([-+−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?)")


def final_answer_text(text: str) -> str:
    """The part of a model output that states the answer."""
    text = text.split("</think>")[-1]
    lines = [ln for ln in text.splitlines() if ln.strip().lower().startswith("answer:")]
    if lines:
        return lines[-1].split(":", 1)[1].strip()
    return text.strip()


def _close(a: Fraction, b: Fraction, tol: float) -> bool:
    return abs(a - b) <= max(Fraction(tol) * abs(b), Fraction(1, 10**9))


def _check_number(example: Example, said: str) -> bool:
    want = parse_number(example.meta["value"])
    want_unit = example.meta.get("unit") or None
    got = find_quantities(said)
    if not got:
        return False
    value, unit = got[0]
    if unit is not None and want_unit is not None and unit != want_unit:
        if dimension(unit) != dimension(want_unit):
            return False
        value = convert(value, unit, want_unit)
    elif unit is not None and want_unit is None and dimension(unit) not in ("percent", "money", "count"):
        return False
    return _close(value, want, example.meta.get("tolerance", 1e-9))


def _equations(text: str) -> dict[str, Fraction]:
    return {k: parse_number(v) for k, v in _EQUATION.findall(text)}


def check_answer(example: Example, text: str) -> bool:
    """Whether `text` (a model's final output, reasoning included or not) answers `example`.

    Args:
      example: the example, whose ``meta`` has ``answer``, ``answer_kind`` and ``tolerance``.
      text: the model's output.

    Returns:
      True when the stated answer matches: numbers within ``meta["tolerance"]`` (relative), in the
      expected unit or one convertible to it; every variable of an equation answer; every result
      code of a function-calling answer; a refusal without any tool call; a summary equal to the
      expected line; a text answer (copy drills) equal to the expected text.
    """
    kind = example.meta["answer_kind"]
    said = final_answer_text(text)
    if kind == "number":
        return _check_number(example, said)
    if kind == "equation":
        want, got = _equations(example.meta["answer"]), _equations(said)
        return bool(want) and all(k in got and got[k] == v for k, v in want.items())
    if kind == "results":
        codes = [part.split(": ", 1)[1] for part in example.meta["answer"].split("; ")]
        body = text.split("</think>")[-1]
        return all(code in body for code in codes)
    if kind == "summary":
        return text.split("</think>")[-1].strip() == example.meta["answer"]
    if kind == "text":
        return said.strip() == example.meta["answer"]
    if kind == "refusal":
        return "<tool_call>" not in text and bool(re.search(r"\b(cannot|can't|unable|no (available )?function)",
                                                            said, re.I))
    raise ValueError(f"unknown answer_kind {kind!r}")


def to_json_key(schema: dict) -> str:
    """A canonical JSON text of `schema`, the cache key of its validator."""
    return json.dumps(schema, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: str) -> jsonschema.protocols.Validator:
    # Checking the schema and building the validator dominate the cost; do it once per schema.
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def parse_tool_calls(text: str) -> list[Any]:
    """The ``<tool_call>`` blocks of `text`, each parsed from JSON (None where it does not parse)."""
    out = []
    for body in _TOOL_CALL.findall(text):
        try:
            out.append(json.loads(body))
        except json.JSONDecodeError:
            out.append(None)
    return out


def _normalise(call: Any) -> tuple[str, dict] | None:
    if not isinstance(call, dict):
        return None
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return fn["name"], args


def call_key(name: str, args: dict) -> str:
    """A canonical text of a call: key order ignored; 3 and 3.0 are the same number (JSON Schema)."""
    def norm(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps([name, norm(args)], sort_keys=True)


def check_tool_calls(example: Example, calls: str | list[Any]) -> dict[str, Any]:
    """Scores the calls a model made for the final turn of `example`.

    Args:
      example: an example whose ``meta["calls"]`` lists the expected calls (``[]``: none).
      calls: the model's output text (``<tool_call>`` blocks are parsed) or a list of calls, each
        ``{"name", "arguments"}`` or the OpenAI ``{"function": {...}}`` shape, arguments as a dict
        or a JSON string.

    Returns:
      A dict of booleans and counts: ``parses`` (every call is well-formed JSON with a name and
      an arguments object), ``names_offered`` (every call names an offered function),
      ``schema_valid`` (every call's arguments validate against its schema), ``valid`` (all
      three), ``choice_match`` (the called function names equal the expected ones, as a multiset),
      ``exact_match`` (names and arguments equal the expected calls, in any order), ``n_calls``,
      ``n_expected`` and ``errors`` (one message per problem).
    """
    raw = parse_tool_calls(calls) if isinstance(calls, str) else list(calls)
    expected = example.meta.get("calls")
    if expected is None:
        raise ValueError(f"example of task {example.meta.get('task')!r} has no expected calls")
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in example.tools}
    errors: list[str] = []
    parsed: list[tuple[str, dict]] = []
    for k, c in enumerate(raw):
        norm = _normalise(c)
        if norm is None:
            errors.append(f"call {k} does not parse")
        else:
            parsed.append(norm)
    names_ok = schema_ok = True
    for name, args in parsed:
        if name not in schemas:
            names_ok = schema_ok = False
            errors.append(f"{name!r} is not an offered function")
            continue
        error = jsonschema.exceptions.best_match(_validator(to_json_key(schemas[name])).iter_errors(args))
        if error is not None:
            schema_ok = False
            errors.append(f"{name}: {error.message}")
    parses = len(parsed) == len(raw)
    want = Counter(call_key(c["name"], c["arguments"]) for c in expected)
    got = Counter(call_key(n, a) for n, a in parsed)
    return {
        "parses": parses,
        "names_offered": names_ok,
        "schema_valid": schema_ok,
        "valid": parses and names_ok and schema_ok,
        "choice_match": parses and Counter(n for n, _ in parsed) == Counter(c["name"] for c in expected),
        "exact_match": parses and got == want,
        "n_calls": len(raw),
        "n_expected": len(expected),
        "errors": errors,
    }
