"""The task registry, `generate` for one example and `mixture` for a deterministic stream."""

import dataclasses
import random
from typing import Callable, Iterator

from train.synthetic import (algebra, arithmetic, chemistry, combinatorics, conversions, drills, fact_drills, physics,
                             summaries, word_problems)
from train.synthetic import function_calling as fc
from train.synthetic.example import SPLITS, Example, with_effort_hint
from train.synthetic.problem import EFFORTS, Problem, build_stem_example, check_effort


def _pictured(maker: str) -> Callable[[random.Random, int, str], Problem | Example]:
    """``images.<maker>``, imported on first use: ``python -m train.synthetic.images`` must not find
    the module already imported by the package (runpy warns), and text-only runs skip Pillow."""

    def make(rng: random.Random, level: int, split: str) -> Problem | Example:
        from train.synthetic import images

        return getattr(images, maker)(rng, level, split)

    make.__name__ = maker
    return make


@dataclasses.dataclass(frozen=True)
class Task:
    """A registered task.

    Attributes:
      name: the registry key, recorded in ``meta["task"]``.
      suite: "stem" (a problem with an answer; works with and without tools), "tools"
        (function calling over random schemas; tools always offered) or "summary" (summarising
        a STEM example's reasoning in one line, answered without thinking; no tools) or "drill"
        (training only, no tools: copying numbers back, the skill under every STEM answer; copying
        never-seen words back, the skill under every function call; recalling the atomic masses
        and unit factors problems state; whether the tool list offers each of several needed
        function names, the choice under every call) or
        "vision" (a STEM problem shown as a picture, ``train/synthetic/images.py``; with and
        without tools like stem; only for models with a vision tower, so never in a default mix)
        or "reading" (a picture of a few numbers or a price, read back verbatim: the vision
        tower's drill; no tools; only for models with a vision tower).
      make: ``(rng, level, split) -> Problem`` for stem and vision tasks, ``-> Example`` for the others.
    """

    name: str
    suite: str
    make: Callable[[random.Random, int, str], Problem | Example]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", "stem", arithmetic.make_arithmetic),
        Task("percentages", "stem", arithmetic.make_percentages),
        Task("word_problems", "stem", word_problems.make_word_problem),
        Task("linear_equations", "stem", algebra.make_linear_equation),
        Task("unit_conversion", "stem", conversions.make_conversion),
        Task("physics", "stem", physics.make_physics),
        Task("chemistry", "stem", chemistry.make_chemistry),
        Task("combinatorics", "stem", combinatorics.make_combinatorics),
        Task("fc_single", "tools", fc.make_single),
        Task("fc_parallel", "tools", fc.make_parallel),
        Task("fc_none", "tools", fc.make_none),
        Task("fc_multiturn", "tools", fc.make_multiturn),
        Task("summarize", "summary", summaries.make_summary),
        Task("copy", "drill", drills.make_copy),
        Task("words", "drill", drills.make_word_copy),
        Task("facts", "drill", fact_drills.make_facts),
        Task("lookup", "drill", fc.make_lookup),
        Task("image_text", "vision", _pictured("make_text_image")),
        Task("image_table", "vision", _pictured("make_table_image")),
        Task("image_chart", "vision", _pictured("make_chart_image")),
        Task("image_triangle", "vision", _pictured("make_triangle_image")),
        Task("image_read", "reading", _pictured("make_reading")),
    )
}

SUITES = {suite: tuple(n for n, t in TASKS.items() if t.suite == suite)
          for suite in ("stem", "tools", "summary", "drill", "vision", "reading")}

# The suites whose examples carry pictures, and their tasks.
IMAGE_SUITES = ("vision", "reading")
IMAGE_TASKS = tuple(n for n, t in TASKS.items() if t.suite in IMAGE_SUITES)
# The tasks of a mix that names none: everything a text-only model can read.
TEXT_TASKS = tuple(n for n in TASKS if n not in IMAGE_TASKS)


def task_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Task -> weight, with suite names expanded: ``{"vision": 1}`` is each vision task at 1/4.

    None gives every text task (`TEXT_TASKS`) weight 1. A task named both alone and through its
    suite gets the sum.

    Raises:
      ValueError: a name that is neither a task nor a suite, or weights without a positive sum.
    """
    if weights is None:
        return {name: 1.0 for name in TEXT_TASKS}
    out: dict[str, float] = {}
    for name, w in weights.items():
        members = (name,) if name in TASKS else SUITES.get(name)
        if not members:
            raise ValueError(f"unknown task {name!r} in tasks; known: {', '.join(TASKS)} "
                             f"or a suite: {', '.join(SUITES)}")
        for m in members:
            out[m] = out.get(m, 0.0) + float(w) / len(members)
    if any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights!r}")
    return out


def _check(level: int, split: str) -> None:
    if not isinstance(level, int) or not 1 <= level <= 5:
        raise ValueError(f"level must be an integer 1..5, got {level!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def generate(task: str | None = None, *, level: int, rng: random.Random | None = None, seed: int | None = None,
             split: str = "train", tools: bool = True, effort: str | None = None) -> Example:
    """One example.

    Args:
      task: a key of `TASKS`; None draws one uniformly among the text tasks (stem tasks when
        ``tools=False``).
      level: difficulty 1..5.
      rng: the random source (advanced by the call); or give `seed` instead.
      seed: builds ``random.Random(seed)`` when `rng` is None. Same seed, same example.
      split: "train" or "heldout"; selects disjoint vocabularies for function names and schemas.
      tools: offer the calculator and python tools; False makes the model compute in its
        reasoning (stem tasks only).
      effort: ask at this reasoning effort (``problem.EFFORTS``): the system turn says so, and a
        stem or vision problem's reasoning is as long as the effort asks (``problem.trace_depth``);
        function calling keeps its reasoning. Summaries and drills take none. None: no hint.

    Raises:
      ValueError: unknown task, level out of range, bad split, no randomness given, or
        ``tools=False`` for a function-calling task, or an effort for a summary or drill.
    """
    _check(level, split)
    check_effort(effort)
    if rng is None:
        if seed is None:
            raise ValueError("give rng or seed")
        rng = random.Random(seed)
    if task is None:
        task = rng.choice(SUITES["stem"] if not tools else TEXT_TASKS)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    if spec.suite == "tools":
        if not tools:
            raise ValueError(f"task {task!r} is function calling and needs tools=True")
        return with_effort_hint(spec.make(rng, level, split), effort)
    if spec.suite in ("summary", "drill", "reading"):
        if effort is not None:
            raise ValueError(f"task {task!r} ({spec.suite}) takes no reasoning effort")
        return spec.make(rng, level, split)
    return build_stem_example(spec.make(rng, level, split), task=task, level=level, split=split, tools=tools,
                              effort=effort)


def mixture(seed: int, levels: dict[int, float], split: str = "train", n: int | None = None, *,
            tasks: dict[str, float] | None = None, tools_fraction: float = 0.8,
            efforts: dict[str | None, float] | None = None) -> Iterator[Example]:
    """A deterministic stream of examples: the i-th depends only on (`seed`, i).

    Args:
      seed: the stream's seed.
      levels: level -> weight, e.g. ``{1: 1, 2: 2, 3: 2}`` (weights need not sum to 1).
      split: "train" or "heldout".
      n: how many examples; None streams forever.
      tasks: task (or suite) -> weight (see `task_weights`); default every text task with weight 1.
      tools_fraction: the share of stem examples that offer tools (the rest compute in reasoning).
      efforts: effort (or None: no hint) -> weight, drawn for every stem, vision and
        function-calling example (see `generate`); None: no hints at all.

    Yields:
      Examples. Each one is drawn from its own ``random.Random((seed, i))``-like seed, so a stream
      can be resumed or sharded at any index by `mixture_at`.
    """
    if not levels or any(w < 0 for w in levels.values()) or sum(levels.values()) <= 0:
        raise ValueError(f"levels must map levels to non-negative weights with a positive sum, got {levels!r}")
    for lv in levels:
        _check(lv, split)
    tasks = task_weights(tasks or None)
    if not 0 <= tools_fraction <= 1:
        raise ValueError(f"tools_fraction must be in [0, 1], got {tools_fraction}")
    check_efforts(efforts)
    i = 0
    while n is None or i < n:
        yield mixture_at(seed, i, levels, split, tasks, tools_fraction, efforts)
        i += 1


def check_efforts(efforts: dict[str | None, float] | None) -> None:
    """Raises ValueError for an effort mix with an unknown name or without a positive weight."""
    if efforts is None:
        return
    for name in efforts:
        if name is not None and name not in EFFORTS:
            raise ValueError(f"unknown effort {name!r} in efforts; known: {', '.join(EFFORTS)} or None (no hint)")
    if any(w < 0 for w in efforts.values()) or sum(efforts.values()) <= 0:
        raise ValueError(f"effort weights must be >= 0 with a positive sum, got {efforts!r}")


def mixture_at(seed: int, index: int, levels: dict[int, float], split: str, tasks: dict[str, float],
               tools_fraction: float, efforts: dict[str | None, float] | None = None) -> Example:
    """The `index`-th example of ``mixture(seed, levels, split, tasks=tasks, ...)``."""
    rng = random.Random(seed * 1_000_003 + index)
    level = rng.choices(list(levels), weights=list(levels.values()))[0]
    task = rng.choices(list(tasks), weights=list(tasks.values()))[0]
    tools = TASKS[task].suite == "tools" or rng.random() < tools_fraction
    effort = None
    if efforts and TASKS[task].suite in ("stem", "vision", "tools"):
        # Its own random source: the rest of the example is what it is without efforts.
        pick = random.Random(f"effort:{seed}:{index}")
        effort = pick.choices(list(efforts), weights=list(efforts.values()))[0]
    return generate(task, level=level, rng=rng, split=split, tools=tools, effort=effort)
