"""Built-in tool execution and the structured log format, without a server."""

from __future__ import annotations

import json
import logging

import pytest

from serve.api.logs import JsonFormatter
from serve.tool_loop import run_builtin


def test_calculator_outcomes():
    assert run_builtin("calculator", '{"expression": "2**10 + 0.1 + 0.2"}').output == "1024.3"
    bad = run_builtin("calculator", '{"expression": "1/0"}')
    assert bad.is_error and bad.output.startswith("error: ")
    assert run_builtin("calculator", '{"x": 1}').output == 'error: calculator needs {"expression": "<text>"}'
    assert run_builtin("calculator", "{").is_error
    with pytest.raises(ValueError, match="'shell' is not a built-in tool"):
        run_builtin("shell", "{}")


def test_python_outcomes():
    ok = run_builtin("python", json.dumps({"code": "print(sum(range(10)))"}))
    assert (ok.output, ok.is_error) == ("45", False)
    err = run_builtin("python", json.dumps({"code": "raise ValueError('boom')"}))
    assert err.is_error and "ValueError: boom" in err.output


def test_json_log_lines_carry_fields():
    record = logging.LogRecord("kestrel.api", logging.INFO, __file__, 1, "response finished", None, None)
    record.fields = {"response_id": "resp_1", "output_tokens": 7}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "response finished" and line["level"] == "info"
    assert line["response_id"] == "resp_1" and line["output_tokens"] == 7
    assert line["ts"].endswith("Z")
