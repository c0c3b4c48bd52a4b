"""Tools the server (and the synthetic data generator) can run for the model."""

from serve.tools.calculator import calculate, evaluate, format_number, trace
from serve.tools.python_sandbox import SandboxLimits, ToolResult, render_for_model, run_python

__all__ = ["SandboxLimits", "ToolResult", "calculate", "evaluate", "format_number", "render_for_model",
           "run_python", "trace"]
