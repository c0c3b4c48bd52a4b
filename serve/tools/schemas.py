"""The built-in tools' schemas, in the OpenAI function shape: what the server offers for a
request's ``calculator`` / ``python`` tools and what kestrel-nano's training data offers, one
definition so the model is served the very tool descriptions it was trained on."""

from typing import Any

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression exactly. Supports + - * / // % ** and parentheses, "
            "decimals, sqrt, sin, cos, tan (radians), log (base 10), ln, exp, abs, round, min, max, "
            "factorial, comb, perm and the constants pi and e."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "The expression, e.g. (3 + 4.5) * 2"}
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}

PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": (
            "Run a short Python program and return what it prints. The modules math, fractions "
            "and itertools can be imported."
        ),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source that prints its result"}},
            "required": ["code"],
            "additionalProperties": False,
        },
    },
}
