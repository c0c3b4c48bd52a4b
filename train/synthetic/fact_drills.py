"""Fact drills: the fixed tables STEM answers recall, asked on their own.

A chemistry problem's Given line lists the atomic masses of its formula's elements, and a unit
conversion's plan states each unit's factor to its dimension's base. Those are recalled, not
copied: the tokenizer writes most formulas as one piece (" NaOH", " CaCO" "3"), so nothing in the
question spells the elements out. A whole nano run shows each compound a few dozen times inside
long problems, and the models trained so far recall wrongly (a 2026-12-02 run listed Na and Cl
for NaOH and wrote "1 MB = 1000000000 B"). A drill asks 2 to 4 facts in a few dozen tokens and
answers each with the exact text the problems write: a formula's masses (``NaOH: Na = 22.99 g/mol; O = 15.999 g/mol; H =
1.008 g/mol``, the Given line's entries in its order) and a unit's factor (``1 GiB = 1073741824
B``, the plan's words). The tables are the ones the problems use, so there is nothing held out to
leak. Training only; no tools.
"""

from __future__ import annotations

import random

from train.synthetic.chemistry import COMPOUNDS, elements, masses_given
from train.synthetic.conversions import FACT_UNITS, fact_base, unit_fact
from train.synthetic.drills import drill_example
from train.synthetic.example import Example
from train.synthetic.problem import pick
from train.synthetic.quantities import UNIT_NAMES

_COMPOUND_ASK = ("the atomic masses in {f}", "the elements of {f} with their atomic masses",
                 "what one mole of {f} is made of")
_UNIT_ASK = ("how many {base} are in 1 {u}", "1 {u} in {base}", "the size of 1 {u} in {base}")
_OPEN = ("Recall {x}.", "From memory, give {x}.", "State {x}.", "Without tools: {x}.")


def _ask_compound(rng: random.Random) -> tuple[str, str, str]:
    """(question part, reasoning line, answer part) for one compound."""
    f = pick(rng, COMPOUNDS)
    return (pick(rng, _COMPOUND_ASK).format(f=f), f"{f}: " + "; ".join(masses_given([f])) + ".",
            f"{f}: " + ", ".join(elements([f])))


def _ask_unit(rng: random.Random) -> tuple[str, str, str]:
    """(question part, reasoning line, answer part) for one unit's factor to its base."""
    dim, unit = pick(rng, FACT_UNITS)
    fact, base = unit_fact(dim, unit), fact_base(dim)
    base_word = UNIT_NAMES.get(base, base) if rng.random() < 0.5 else base  # "grams": a plural
    return pick(rng, _UNIT_ASK).format(u=unit, base=base_word), f"{fact}.", fact


def make_facts(rng: random.Random, level: int, split: str) -> Example:
    """One drill: 2 to 4 facts (1 + level, at most 4), each a compound's atomic masses or a unit's factor."""
    k = min(4, 1 + level)
    by_line: dict[str, tuple[str, str, str]] = {}  # each fact once
    while len(by_line) < k:
        ask = (_ask_compound if rng.random() < 0.5 else _ask_unit)(rng)
        by_line.setdefault(ask[1], ask)
    asks = list(by_line.values())
    parts = [a[0] for a in asks]
    question = pick(rng, _OPEN).format(x="; ".join(parts[:-1]) + " and " + parts[-1])
    answer = "; ".join(a[2] for a in asks)
    reasoning = "Task: recall.\n" + "\n".join(a[1] for a in asks)
    return drill_example("facts", level, split, question, reasoning, answer, f"Recalled {k} facts.")
