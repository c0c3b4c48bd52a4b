"""Turns a STEM `Problem` into a conversation with one regular reasoning scheme.

The scheme (the same for every STEM task, so that a tiny model can learn it):

With tools, one assistant message per tool call, thinking before and after each call::

    <think> Task: ... / Given: ... / Plan: ... / Step 1: <purpose>. Use the calculator. </think>
    <tool_call> {"name": "calculator", "arguments": {"expression": "..."}} </tool_call>
    <tool_response> 178377 </tool_response>
    <think> The calculator returned 178377: <purpose> is 178377. / Step 2: ... </think> <tool_call>...
    ...
    <think> The calculator returned R: <purpose> is R. / So the answer is R m. </think>
    Answer: R m
    Summary: <one line>

Tool arguments are copied from the prompt (numbers) or from earlier tool outputs, and the final
answer is the last tool output plus its unit. A problem solved by one program (``code``) makes a
single ``python`` call instead and its printed output is the answer.

Without tools, a single assistant message computes in its reasoning: each step lists every
operation of its expression (``4821 * 37 = 178377``, one per line, in evaluation order) from the
exact calculator trace, then the same ``Answer:`` / ``Summary:`` lines.

Reasoning effort (the system turn's ``Reasoning effort: ...`` line, `with_effort_hint`) sets how
much of the scheme is written (`trace_depth`): ``high`` (and no hint) all of it; ``medium`` drops
the ``Task:`` and ``Given:`` lines; ``low`` also drops the ``Plan:`` line and the sentences that
restate tool results, keeping the step lines, the computation itself (without tools) and ``So the
answer is``. ``auto`` writes what the problem's difficulty needs: low for levels 1 to 3, medium at
level 4, high at level 5. The tool calls and the answer are the same at every effort.
"""

import dataclasses
import random
from fractions import Fraction

from serve.tools.calculator import calculate, format_number, trace
from train.synthetic.example import BUILTIN_TOOLS, SYSTEM_PROMPT, Example, tool_call, with_effort_hint
from train.synthetic.python_tool import run_python
from train.synthetic.quantities import format_quantity


@dataclasses.dataclass
class Step:
    """One computation: `expression` may use ``{r0}``, ``{r1}``... for earlier steps' results."""

    purpose: str  # A noun phrase: "the total cost of the pens".
    expression: str


@dataclasses.dataclass
class Problem:
    """A STEM problem before it becomes a conversation.

    Attributes:
      question: the user's text (the varied phrasing lives here).
      kind: what sort of problem, for the reasoning's ``Task:`` line.
      given: the quantities read from the question, ``["a = 3 m/s^2", ...]``.
      plan: one sentence: the formula or method.
      steps: the computations, in order.
      summary: one line; ``{answer}`` is replaced by the final answer.
      unit: the answer's unit ("" for none; "$" and "%" are written as prefix / suffix).
      answer_template: how step results make the answer body, e.g. ``"x = {r0}"``.
      code: if set, with tools the problem is solved by this one `python` program, whose printed
        output is the answer body (it must print the same text `answer_template` gives).
      code_purpose: the step line for the python call.
      tolerance: relative tolerance for checking numeric answers.
      answer_kind: "number" or "equation".
      reads: for a problem shown as a picture, the first line of the reasoning: what the model
        reads off the image ("The chart shows A = 34, B = 21.").
      images: PNG bytes of the pictures the question shows, in the order of the ``<image>``
        placeholders in `question`.
      figure: for a pictured problem, the generator's record of what it drew (``kind``, the
        values, every string drawn); kept in ``meta["figure"]`` so checks need no OCR.
    """

    question: str
    kind: str
    given: list[str]
    plan: str
    steps: list[Step]
    summary: str
    unit: str = ""
    answer_template: str = "{r_last}"
    code: str | None = None
    code_purpose: str = "run the computation"
    tolerance: float = 1e-9
    answer_kind: str = "number"
    reads: str = ""
    images: list[bytes] = dataclasses.field(default_factory=list)
    figure: dict | None = None


EFFORTS = ("low", "medium", "high", "auto")


def check_effort(effort: str | None) -> None:
    """Raises ValueError for an effort outside `EFFORTS` (None, no hint, is allowed)."""
    if effort is not None and effort not in EFFORTS:
        raise ValueError(f"effort must be one of {', '.join(EFFORTS)} or None, got {effort!r}")


def trace_depth(effort: str | None, level: int) -> str:
    """How much of the reasoning scheme an example at `effort` writes: ``full``, ``plan`` (no
    Task/Given lines) or ``steps`` (no header, no restated results).

    Raises:
      ValueError: an effort outside `EFFORTS` (and not None).
    """
    check_effort(effort)
    if effort == "auto":
        effort = "low" if level <= 3 else "medium" if level == 4 else "high"
    return {None: "full", "high": "full", "medium": "plan", "low": "steps"}[effort]


def _header(p: Problem, depth: str = "full") -> list[str]:
    lines = [p.reads] if p.reads else []
    if depth == "full":
        lines.append(f"Task: {p.kind}.")
        if p.given:
            lines.append("Given: " + "; ".join(p.given) + ".")
    if depth != "steps":
        lines.append(f"Plan: {p.plan}")
    return lines


def _body(p: Problem, results: list[str]) -> str:
    names = {f"r{i}": r for i, r in enumerate(results)}
    return p.answer_template.format(r_last=results[-1], **names)


def _final(answer: str, summary: str) -> str:
    return f"Answer: {answer}\nSummary: {summary}"


def build_stem_example(p: Problem, *, task: str, level: int, split: str, tools: bool,
                       effort: str | None = None) -> Example:
    """Builds the conversation for `p` asked at reasoning `effort` (see the module docstring)."""
    depth = trace_depth(effort, level)
    restate = depth != "steps"
    messages: list[dict] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": p.question},
    ]
    if tools and p.code is not None:
        out = run_python(p.code)
        reasoning = "\n".join(_header(p, depth) + [f"Step 1: {p.code_purpose}. Use python."])
        answer = format_quantity(out, p.unit)
        body = out
        messages += [
            {"role": "assistant", "content": "", "reasoning_content": reasoning,
             "tool_calls": [tool_call("python", {"code": p.code}, "call_0")]},
            {"role": "tool", "tool_call_id": "call_0", "content": out},
            {"role": "assistant", "reasoning_content": (f"Python printed {out}.\n" if restate else "")
             + f"So the answer is {answer}."},
        ]
    elif tools:
        results: list[str] = []
        lines = _header(p, depth)
        for i, step in enumerate(p.steps):
            expr = step.expression.format(**{f"r{j}": r for j, r in enumerate(results)})
            out = calculate(expr)
            lines.append(f"Step {i + 1}: {step.purpose}. Use the calculator.")
            messages += [
                {"role": "assistant", "content": "", "reasoning_content": "\n".join(lines),
                 "tool_calls": [tool_call("calculator", {"expression": expr}, f"call_{i}")]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": out},
            ]
            results.append(out)
            lines = [f"The calculator returned {out}: {step.purpose} is {out}."] if restate else []
        body = _body(p, results)
        answer = format_quantity(body, p.unit)
        lines.append(f"So the answer is {answer}.")
        messages.append({"role": "assistant", "reasoning_content": "\n".join(lines)})
    else:
        results = []
        lines = _header(p, depth)
        for i, step in enumerate(p.steps):
            expr = step.expression.format(**{f"r{j}": r for j, r in enumerate(results)})
            out, ops = trace(expr)
            lines.append(f"Step {i + 1}: {step.purpose}.")
            lines += ops or [f"{expr} = {out}"]
            lines.append(f"So {step.purpose} is {out}.")
            results.append(out)
        body = _body(p, results)
        answer = format_quantity(body, p.unit)
        lines.append(f"So the answer is {answer}.")
        messages.append({"role": "assistant", "reasoning_content": "\n".join(lines)})
    summary = p.summary.format(answer=answer)
    messages[-1]["content"] = _final(answer, summary)
    meta = {
        "task": task, "level": level, "answer": answer, "summary": summary, "split": split,
        "tools": tools, "answer_kind": p.answer_kind, "tolerance": p.tolerance, "prompt_len": 2,
        "unit": p.unit, "value": body,
    }
    if p.figure is not None:
        meta["figure"] = p.figure
    example = Example(messages=messages, tools=[dict(t) for t in BUILTIN_TOOLS] if tools else [], meta=meta,
                      images=list(p.images))
    return with_effort_hint(example, effort)


# Small helpers the task modules share for drawing numbers and phrasing.


def pick(rng: random.Random, options):
    """One element of `options`."""
    return options[rng.randrange(len(options))]


def rand_digits(rng: random.Random, digits: int) -> int:
    """A positive integer with exactly `digits` digits."""
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def rand_decimal(rng: random.Random, lo: int, hi: int, places: int) -> str:
    """A decimal in [lo, hi] with up to `places` decimals, as text without trailing zeros."""
    scale = 10**places
    return format_number(Fraction(rng.randint(lo * scale, hi * scale), scale))
