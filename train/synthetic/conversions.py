"""Unit conversions: through each unit's memorised factor to its dimension's base (temperatures: affine).

A conversion is stated as two facts, one per unit ("1 GiB = 1073741824 B and 1 KB = 1000 B"), never
as a factor per pair of units: a dimension of n units is n facts to learn, not n^2, and each fact
reads the same in every problem that uses the unit.
"""

import functools
import random
from fractions import Fraction

from serve.tools.calculator import format_number
from train.synthetic.problem import Problem, Step, pick, rand_decimal
from train.synthetic.quantities import UNIT_NAMES, UNITS

# Dimensions unlocked by level: metric first, then imperial, speeds, data, temperatures.
_BY_LEVEL = {
    1: {"length": ("mm", "cm", "m", "km"), "mass": ("mg", "g", "kg"), "time": ("s", "min", "h")},
    2: {"volume": ("mL", "L", "m^3"), "time": ("ms", "s", "min", "h", "day"), "data": ("B", "KB", "MB", "GB")},
    3: {"length": ("in", "ft", "yd", "mi", "cm", "m", "km"), "mass": ("oz", "lb", "g", "kg")},
    4: {"speed": ("m/s", "km/h", "mph"), "data": ("KiB", "MiB", "GiB", "KB", "MB", "GB"), "temperature": ("°C", "°F", "K")},
    5: {"volume": ("gal", "L", "mL"), "length": ("mi", "km", "ft", "m"), "temperature": ("°C", "°F", "K")},
}

_TEMP_FORMULAS = {
    ("°C", "°F"): ("{v} * 9 / 5 + 32", "F = C * 9/5 + 32."),
    ("°F", "°C"): ("({v} - 32) * 5 / 9", "C = (F - 32) * 5/9."),
    ("°C", "K"): ("{v} + 273.15", "K = C + 273.15."),
    ("K", "°C"): ("{v} - 273.15", "C = K - 273.15."),
    ("°F", "K"): ("({v} - 32) * 5 / 9 + 273.15", "K = (F - 32) * 5/9 + 273.15."),
    ("K", "°F"): ("({v} - 273.15) * 9 / 5 + 32", "F = (K - 273.15) * 9/5 + 32."),
}

_ASK = ("Convert {v} {src} to {dst}.", "How many {dst} is {v} {src}?", "Express {v} {src} in {dst}.",
        "What is {v} {src} in {dst}?", "{v} {src} = how many {dst}?", "I have {v} {src}. How much is that in {dst}?")


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1 and len(format_number(x)) <= 14


@functools.cache
def fact_base(dim: str) -> str:
    """The unit every factor of `dim` is stated against: the table's base, or, where a factor to
    it does not end (1 km/h = 5/18 m/s), the first unit that all factors end against."""
    table = UNITS[dim]
    ordered = sorted(table, key=lambda u: table[u] != 1)  # the table's base first
    for base in ordered:
        if all(_terminates(f / table[base]) for f in table.values()):
            return base
    raise ValueError(f"no unit of {dim} states every factor as a finite decimal")


def _factor(dim: str, unit: str) -> str:
    """``"1073741824"`` for GiB: `unit`'s factor to its dimension's fact base."""
    return format_number(UNITS[dim][unit] / UNITS[dim][fact_base(dim)])


def unit_fact(dim: str, unit: str) -> str:
    """``"1 GiB = 1073741824 B"``: the fact a plan states for `unit` (also drilled, ``fact_drills.py``)."""
    return f"1 {unit} = {_factor(dim, unit)} {fact_base(dim)}"


# Every (dimension, unit) a conversion states a fact for: the units above less each fact base.
FACT_UNITS = tuple(sorted({(dim, u) for units in _BY_LEVEL.values() for dim, us in units.items()
                           if dim != "temperature" for u in us if u != fact_base(dim)}))


def _by_unit_facts(dim: str, src: str, dst: str, value: str) -> tuple[str, str]:
    """The expression and plan that convert `value` `src` to `dst` through the fact base."""
    base = fact_base(dim)
    a, b = _factor(dim, src), _factor(dim, dst)
    if src == base:
        return f"{value} / {b}", f"{unit_fact(dim, dst)}, so divide by {b}."
    if dst == base:
        return f"{value} * {a}", f"{unit_fact(dim, src)}, so multiply by {a}."
    return (f"{value} * {a} / {b}",
            f"{unit_fact(dim, src)} and {unit_fact(dim, dst)}, so multiply by {a} and divide by {b}.")


def make_conversion(rng: random.Random, level: int, split: str) -> Problem:
    """One conversion; levels unlock harder dimensions and bigger, more precise values."""
    lv = rng.randint(max(1, level - 1), level)
    dim = pick(rng, sorted(_BY_LEVEL[lv]))
    src, dst = rng.sample(_BY_LEVEL[lv][dim], 2)
    value = rand_decimal(rng, 1, 10 ** rng.randint(1, 1 + level), 0 if level <= 2 else rng.randint(0, 2))
    if dim == "temperature" and rng.random() < 0.3:
        value = "-" + value
    unit_word = (lambda u: UNIT_NAMES.get(u, u)) if rng.random() < 0.5 else (lambda u: u)
    question = pick(rng, _ASK).format(v=value, src=unit_word(src), dst=unit_word(dst))
    if dim == "temperature":
        template, plan = _TEMP_FORMULAS[(src, dst)]
        expr = template.format(v=value)
    else:
        expr, plan = _by_unit_facts(dim, src, dst, value)
    return Problem(
        question=question, kind=f"unit conversion ({dim})", given=[f"value = {value} {src}", f"target unit = {dst}"],
        plan=plan, steps=[Step(f"the value in {dst}", expr)], unit=dst, tolerance=1e-6,
        summary=f"Converted {value} {src} to {dst}: {{answer}}.")
