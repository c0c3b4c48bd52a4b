"""Linear equations: one unknown (calculator) and 2x2 systems (one python program, Cramer's rule).

Solutions are integers by construction (coefficients are drawn, then the constants computed from a
drawn solution), so the calculator's answer and the program's printed answer are the same text.
"""

import random

from train.synthetic.problem import Problem, Step, pick


def _nz(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v != 0:
            return v


def _term(coef: int, var: str, first: bool) -> str:
    sign = "-" if coef < 0 else ("" if first else "+")
    mag = abs(coef)
    body = var if mag == 1 and var else f"{mag}{var}"
    return f"{sign}{body}" if first else f" {sign} {body}"


def _p(v: int) -> str:
    """Negative numbers in parentheses inside expressions: ``(70 - (-5)) / 8``."""
    return f"({v})" if v < 0 else str(v)


def _side(*terms: tuple[int, str]) -> str:
    out, first = "", True
    for coef, var in terms:
        if coef == 0:
            continue
        out += _term(coef, var, first)
        first = False
    return out or "0"


_ASK1 = ("Solve for {v}: {eq}", "Find {v} if {eq}.", "What value of {v} satisfies {eq}?",
         "Solve the equation {eq}.", "{eq}. What is {v}?")
_ASK2 = ("Solve the system: {e1} and {e2}.", "Find {v} and {w} if {e1} and {e2}.",
         "Two equations: {e1}; {e2}. Solve for {v} and {w}.", "What are {v} and {w} given {e1} and {e2}?")


# The unknown's letter. Held-out problems ask for letters training never solves for (a, k, z),
# so the model must copy the question's letter, not recall one of a few: training draws from many
# (a handful let a small model answer "x" or "t" whatever was asked). Not d: the systems' program
# names the determinant d.
VARIABLES = {"train": ("x", "y", "n", "t", "b", "c", "m", "p", "q", "r", "s", "u", "v", "w"),
             "heldout": ("x", "a", "k", "z")}


def make_linear_equation(rng: random.Random, level: int, split: str) -> Problem:
    """Level 1: ax + b = c; 2: larger, negatives; 3: unknown on both sides; 4-5: 2x2 systems."""
    var = pick(rng, VARIABLES[split])
    span = (9, 15, 20, 12, 30)[level - 1]
    if level <= 3:
        x = rng.randint(-span if level > 1 else 0, 2 * span)
        a, b = _nz(rng, 2 if level == 1 else -span, span), rng.randint(-5 * span, 5 * span)
        if level == 1:
            a = abs(a)
        if level < 3:
            c = a * x + b
            eq = f"{_side((a, var), (b, ''))} = {c}"
            expr = f"({c} - {_p(b)}) / {a}"
            plan = f"Move {b} to the right side and divide by {a}: {var} = {expr}."
        else:
            cc = _nz(rng, -span, span)
            while cc == a:
                cc = _nz(rng, -span, span)
            d = (a - cc) * x + b
            eq = f"{_side((a, var), (b, ''))} = {_side((cc, var), (d, ''))}"
            expr = f"({d} - {_p(b)}) / ({a} - {_p(cc)})"
            plan = f"Collect {var} on the left and constants on the right: {var} = {expr}."
        return Problem(
            question=pick(rng, _ASK1).format(v=var, eq=eq), kind="linear equation in one unknown",
            given=[f"equation: {eq}"], plan=plan, steps=[Step(f"the value of {var}", expr)],
            answer_template=f"{var} = {{r0}}", answer_kind="equation",
            summary=f"Isolated {var} in {eq}: {{answer}}.")
    w = "y" if var != "y" else "x"
    sol_v, sol_w = rng.randint(-span, span), rng.randint(-span, span)
    while True:
        a1, b1, a2, b2 = (_nz(rng, -span // 2 - 1, span // 2 + 1) for _ in range(4))
        if a1 * b2 - a2 * b1 != 0:
            break
    c1, c2 = a1 * sol_v + b1 * sol_w, a2 * sol_v + b2 * sol_w
    e1 = f"{_side((a1, var), (b1, w))} = {c1}"
    e2 = f"{_side((a2, var), (b2, w))} = {c2}"
    code = (
        "from fractions import Fraction\n"
        f"a1, b1, c1 = {a1}, {b1}, {c1}\n"
        f"a2, b2, c2 = {a2}, {b2}, {c2}\n"
        "d = a1 * b2 - a2 * b1\n"
        f"{var} = Fraction(c1 * b2 - c2 * b1, d)\n"
        f"{w} = Fraction(a1 * c2 - a2 * c1, d)\n"
        f'print(f"{var} = {{{var}}}, {w} = {{{w}}}")'
    )
    steps = [
        Step("the determinant D", f"{_p(a1)} * {_p(b2)} - {_p(a2)} * {_p(b1)}"),
        Step(f"D{var}", f"{_p(c1)} * {_p(b2)} - {_p(c2)} * {_p(b1)}"),
        Step(f"D{w}", f"{_p(a1)} * {_p(c2)} - {_p(a2)} * {_p(c1)}"),
        Step(f"the value of {var}", "({r1}) / ({r0})"),
        Step(f"the value of {w}", "({r2}) / ({r0})"),
    ]
    return Problem(
        question=pick(rng, _ASK2).format(v=var, w=w, e1=e1, e2=e2), kind="system of two linear equations",
        given=[f"equation 1: {e1}", f"equation 2: {e2}"],
        plan=f"Cramer's rule: D = a1*b2 - a2*b1, {var} = (c1*b2 - c2*b1) / D, {w} = (a1*c2 - a2*c1) / D.",
        steps=steps, code=code, code_purpose=f"solve for {var} and {w} with Cramer's rule",
        answer_template=f"{var} = {{r3}}, {w} = {{r4}}", answer_kind="equation",
        summary="Solved the 2x2 system with Cramer's rule: {answer}.")
