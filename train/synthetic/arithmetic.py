"""Arithmetic tasks: multi-digit arithmetic with large numbers, and percentages."""

import random

from train.synthetic.problem import Problem, Step, pick, rand_decimal, rand_digits

_ASK = (
    "What is {e}?", "Compute {e}.", "Calculate {e} exactly.", "Find the value of {e}.",
    "Evaluate: {e}", "I need the exact value of {e}.", "Please work out {e}.", "{e} = ?",
    "Can you tell me what {e} equals?", "Quick one: {e}",
)
_WORDS = {
    "+": ("What is the sum of {a} and {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?"),
    "-": ("Subtract {b} from {a}.", "What is {a} minus {b}?", "What is the difference {a} - {b}?"),
    "*": ("What is the product of {a} and {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"),
    "/": ("Divide {a} by {b}.", "What is {a} divided by {b}?", "What is the quotient of {a} and {b}?"),
}
_PRETTY = {"*": ("*", "×"), "/": ("/", "÷"), "+": ("+",), "-": ("-", "−")}


def _operand(rng: random.Random, level: int) -> str:
    lo, hi = ((1, 3), (2, 5), (3, 7), (5, 12), (8, 20))[level - 1]
    if level >= 4 and rng.random() < 0.25:
        return rand_decimal(rng, 1, 10 ** rng.randint(1, 4), rng.randint(1, 3))
    return str(rand_digits(rng, rng.randint(lo, hi)))


def _division(rng: random.Random, level: int) -> tuple[str, str]:
    # Exact quotients: the divisor times a random quotient, so answers stay integers.
    b = rng.randint(2, 10 ** rng.randint(1, min(2 + level, 6)))
    q = rand_digits(rng, rng.randint(1, 2 + 2 * level))
    return str(b * q), str(b)


def make_arithmetic(rng: random.Random, level: int, split: str) -> Problem:
    """Level 1: one + or -; 2: one operation incl. *; 3: two; 4: three, decimals; 5: four, huge."""
    n_ops = (1, 1, 2, 3, 4)[level - 1]
    ops_allowed = ("+", "-") if level == 1 else ("+", "-", "*", "/")
    expr = _operand(rng, level)
    op_list = []
    for k in range(n_ops):
        op = pick(rng, ops_allowed)
        if op == "/":
            a, b = _division(rng, level)
            term = f"{a} / {b}"
            expr = f"({expr}) + {term}" if k else term
            op_list.append("+" if k else "/")
            continue
        b = _operand(rng, level)
        expr = f"({expr}) {op} {b}" if k and rng.random() < 0.5 else f"{expr} {op} {b}"
        op_list.append(op)
    if n_ops == 1 and rng.random() < 0.4:
        op = op_list[0]
        a, b = expr.split(f" {op} ")
        question = pick(rng, _WORDS[op]).format(a=a, b=b)
    else:
        pretty = expr
        for op, forms in _PRETTY.items():
            pretty = pretty.replace(f" {op} ", f" {pick(rng, forms)} ")
        question = pick(rng, _ASK).format(e=pretty)
    return Problem(
        question=question,
        kind="arithmetic",
        given=[f"expression = {expr}"],
        plan="Evaluate the expression exactly with the calculator.",
        steps=[Step("the value of the expression", expr)],
        summary=f"Evaluated {expr} exactly to get {{answer}}.",
    )


def make_percentages(rng: random.Random, level: int, split: str) -> Problem:
    """Percent of, what percent, increase, discount, percent change; two steps from level 4."""
    kinds = ["of", "what", "increase", "discount", "change"][: 2 + level]
    kind = pick(rng, kinds)
    places = 0 if level <= 2 else 1
    p = rand_decimal(rng, 1, 95, places) if level > 2 else str(pick(rng, (5, 10, 15, 20, 25, 30, 40, 50, 75)))
    x = str(rng.randint(20, 10 ** (level + 1)))
    if kind == "of":
        q = pick(rng, ("What is {p}% of {x}?", "Find {p} percent of {x}.", "How much is {p}% of {x}?"))
        return Problem(
            question=q.format(p=p, x=x), kind="percentage of a number", given=[f"percent = {p}%", f"whole = {x}"],
            plan="Multiply the whole by the percent and divide by 100.",
            steps=[Step(f"{p}% of {x}", f"{x} * {p} / 100")],
            summary=f"Took {p}% of {x} as {x} * {p} / 100 = {{answer}}.")
    if kind == "what":
        whole = rng.randint(10, 10 ** (level + 1))
        part = rng.randint(1, whole)
        q = pick(rng, ("{a} is what percent of {b}?", "What percentage of {b} is {a}?",
                       "Express {a} as a percent of {b}."))
        return Problem(
            question=q.format(a=part, b=whole), kind="percentage of a whole", given=[f"part = {part}", f"whole = {whole}"],
            plan="Divide the part by the whole and multiply by 100.",
            steps=[Step("the percentage", f"{part} / {whole} * 100")], unit="%", tolerance=1e-6,
            summary=f"Computed {part} / {whole} * 100 = {{answer}}.")
    if kind == "change":
        old = rng.randint(10, 10 ** (level + 1))
        new = max(1, old + rng.randint(-old // 2, old))
        q = pick(rng, ("A value goes from {a} to {b}. What is the percent change?",
                       "Sales moved from {a} units to {b} units. By what percent did they change?",
                       "Find the percentage change from {a} to {b}."))
        return Problem(
            question=q.format(a=old, b=new), kind="percent change", given=[f"old = {old}", f"new = {new}"],
            plan="Percent change = (new - old) / old * 100.",
            steps=[Step("the percent change", f"({new} - {old}) / {old} * 100")], unit="%", tolerance=1e-6,
            summary=f"Percent change = ({new} - {old}) / {old} * 100 = {{answer}}.")
    price = rand_decimal(rng, 5, 10 ** (level + 1), 2 if level > 2 else 0)
    if kind == "increase":
        q = pick(rng, ("A price of ${x} goes up by {p}%. What is the new price?",
                       "Rent is ${x} and rises {p}%. What is the new rent?",
                       "Increase ${x} by {p}%."))
        steps = [Step("the increase", f"{price} * {p} / 100"), Step("the new price", f"round({price} + {{r0}}, 2)")]
        plan = "Find p% of the price, then add it to the price and round to cents."
        summary = f"Added {p}% of ${price} to ${price} to get {{answer}}."
    else:
        q = pick(rng, ("A jacket costs ${x} and is {p}% off. What is the sale price?",
                       "What do you pay for a ${x} item with a {p}% discount?",
                       "Take {p}% off ${x}."))
        steps = [Step("the discount", f"{price} * {p} / 100"), Step("the sale price", f"round({price} - {{r0}}, 2)")]
        plan = "Find p% of the price, then subtract it from the price and round to cents."
        summary = f"Subtracted {p}% of ${price} from ${price} to get {{answer}}."
    if level <= 3:  # One step at low levels: multiply by (1 +- p/100) directly.
        sign = "+" if kind == "increase" else "-"
        steps = [Step("the new price", f"round({price} * (100 {sign} {p}) / 100, 2)")]
        plan = f"Multiply the price by (100 {sign} p) / 100 and round to cents."
    return Problem(
        question=q.format(x=price, p=p), kind="price change by a percentage", given=[f"price = ${price}", f"percent = {p}%"],
        plan=plan, steps=steps, unit="$", summary=summary)

