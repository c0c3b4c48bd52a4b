"""Synthetic STEM and tool-use curriculum: generators, chat rendering and answer checking."""

from train.synthetic.checking import check_answer, check_tool_calls, final_answer_text, parse_tool_calls
from train.synthetic.example import (
    BUILTIN_TOOLS, CALCULATOR_TOOL, IMAGE_PLACEHOLDER, PYTHON_TOOL, SPLITS, SYSTEM_PROMPT, Example)
from train.synthetic.python_tool import run_python
from train.synthetic.registry import (IMAGE_SUITES, IMAGE_TASKS, SUITES, TASKS, TEXT_TASKS, Task, generate, mixture,
                                     mixture_at, task_weights)
from train.synthetic.render import render_kestrel, render_segments, render_session

__all__ = [
    "BUILTIN_TOOLS", "CALCULATOR_TOOL", "IMAGE_PLACEHOLDER", "IMAGE_SUITES", "IMAGE_TASKS", "PYTHON_TOOL", "SPLITS",
    "SUITES", "SYSTEM_PROMPT", "TASKS", "TEXT_TASKS", "Example", "Task", "check_answer", "check_tool_calls",
    "final_answer_text", "generate", "mixture", "mixture_at", "parse_tool_calls", "render_kestrel",
    "render_segments", "render_session", "run_python", "task_weights",
]
