"""Runs the built-in tools (``calculator``, ``python``) the model calls inside a response.

The API layer's response loop (``serve/api/session.py``) calls ``run_builtin`` for each built-in
call of a finished engine round, feeds the outputs back as ``tool`` messages and continues the
generation as the next round of the same response. Both tools never raise for the model's sake:
a bad expression, an exception in the code or a sandbox limit comes back as an error text the
model reads, with ``is_error`` set for the client.
"""

from __future__ import annotations

import dataclasses
import json
import time

from serve.tools.calculator import calculate
from serve.tools.python_sandbox import render_for_model, run_python

BUILTIN_NAMES = ("calculator", "python")


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What a built-in tool returned.

    Attributes:
      output: the text the model is shown.
      is_error: the tool failed (the output says how).
      duration_s: wall-clock seconds the tool ran.
    """

    output: str
    is_error: bool
    duration_s: float


def run_builtin(name: str, arguments: str, *, python_timeout_s: float = 10.0) -> ToolOutcome:
    """Runs one built-in tool call (blocking; call it from a worker thread).

    Args:
      name: "calculator" or "python".
      arguments: the call's JSON arguments as the model wrote them (the grammar made them valid
        for the tool's schema, but a replayed history may not be).
      python_timeout_s: the python tool's wall-clock limit.

    Raises:
      ValueError: ``name`` is not a built-in tool (a server bug, never the model's).
    """
    if name not in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is not a built-in tool; expected one of {BUILTIN_NAMES}")
    t0 = time.perf_counter()
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as e:
        return ToolOutcome(f"error: the arguments are not valid JSON: {e}", True, time.perf_counter() - t0)
    if name == "calculator":
        expression = args.get("expression") if isinstance(args, dict) else None
        if not isinstance(expression, str):
            return ToolOutcome('error: calculator needs {"expression": "<text>"}', True, time.perf_counter() - t0)
        try:
            out, err = calculate(expression), False
        except ValueError as e:
            out, err = f"error: {e}", True
        return ToolOutcome(out, err, time.perf_counter() - t0)
    code = args.get("code") if isinstance(args, dict) else None
    if not isinstance(code, str):
        return ToolOutcome('error: python needs {"code": "<source>"}', True, time.perf_counter() - t0)
    result = run_python(code, timeout_s=python_timeout_s)
    return ToolOutcome(render_for_model(result), not result.ok, time.perf_counter() - t0)
