"""Combinatorics: choices, arrangements, codes, words with repeated letters, committees."""

import random
from collections import Counter

from train.synthetic.problem import Problem, Step, pick

_WORDS = {
    "train": ("BANANA", "LETTER", "APPLE", "COFFEE", "BALLOON", "PEPPER", "MISSISSIPPI", "STATISTICS", "SUCCESS"),
    "heldout": ("PARALLEL", "BOOKKEEPER", "ASSESS", "COMMITTEE", "TATTOO", "REFERENCE", "ADDRESSES"),
}


def _py(expr: str) -> str:
    return "import math\nprint(" + expr.replace("comb(", "math.comb(").replace("perm(", "math.perm(").replace(
        "factorial(", "math.factorial(") + ")"


def make_combinatorics(rng: random.Random, level: int, split: str) -> Problem:
    """Levels 1-2 use the calculator; from level 3 the program is a `python` call."""
    kinds = ("choose", "arrange", "shelf", "codes", "word", "committee")[: 2 + level]
    kind = pick(rng, kinds[-4:] if level >= 4 else kinds)
    big = 6 + 6 * level
    if kind == "choose":
        n = rng.randint(4, big)
        k = rng.randint(2, max(2, min(n - 1, 2 + level)))
        q = pick(rng, ("How many ways can you choose {k} people from a group of {n}?",
                       "In how many ways can a team of {k} be picked from {n} players?",
                       "How many {k}-element subsets does a set of {n} elements have?"))
        expr, plan, what = f"comb({n}, {k})", "Order does not matter: C(n, k).", "the number of choices"
        given = [f"n = {n}", f"k = {k}"]
    elif kind == "arrange":
        n = rng.randint(4, big)
        k = rng.randint(2, max(2, min(n - 1, 1 + level)))
        q = pick(rng, ("{n} runners race. In how many ways can the first {k} places be filled?",
                       "How many ordered ways can {k} of {n} books be placed in a row?",
                       "How many ways to give {k} different prizes to {n} students, one each?"))
        expr, plan, what = f"perm({n}, {k})", "Order matters: P(n, k) = n! / (n - k)!.", "the number of arrangements"
        given = [f"n = {n}", f"k = {k}"]
    elif kind == "shelf":
        n = rng.randint(3, 4 + 3 * level)
        k = n
        q = pick(rng, ("In how many orders can {n} different books stand on a shelf?",
                       "How many ways can {n} people line up?"))
        expr, plan, what = f"factorial({n})", "All n items in order: n!.", "the number of orders"
        given = [f"n = {n}"]
    elif kind == "codes":
        n = pick(rng, (2, 10, 26, 36))
        k = rng.randint(2, 2 + 2 * level)
        alpha = {2: "binary digits", 10: "digits 0-9", 26: "letters A-Z", 36: "letters and digits"}[n]
        q = pick(rng, ("How many codes of length {k} can be made from {a} if repeats are allowed?",
                       "A password has {k} characters, each from {a}. How many passwords are possible?"))
        q = q.replace("{a}", alpha)
        expr, plan, what = f"{n}**{k}", "Each position independently: n**k.", "the number of codes"
        given = [f"symbols n = {n}", f"length k = {k}"]
    elif kind == "word":
        word = pick(rng, _WORDS[split])
        counts = sorted(Counter(word).items())
        reps = [c for _, c in counts if c > 1]
        expr = f"factorial({len(word)}) // (" + " * ".join(f"factorial({c})" for c in reps) + ")"
        q = pick(rng, ("How many distinct arrangements of the letters of {w} are there?",
                       "In how many different ways can the letters of the word {w} be ordered?"))
        n, k = len(word), 0
        q = q.replace("{w}", word)
        plan = "Multinomial: n! divided by the factorial of each repeated letter's count."
        what = "the number of distinct arrangements"
        given = [f"word = {word}", f"length = {len(word)}"] + [f"{ch} x {c}" for ch, c in counts if c > 1]
    else:
        a, b = rng.randint(4, 3 + 2 * level), rng.randint(4, 3 + 2 * level)
        i, j = rng.randint(1, 3), rng.randint(1, 3)
        q = pick(rng, ("A committee of {i} teachers and {j} parents is formed from {a} teachers and {b} parents. "
                       "How many committees are possible?",
                       "Choose {i} of {a} red marbles and {j} of {b} blue marbles. How many selections?"))
        q = q.format(i=i, j=j, a=a, b=b)
        expr, plan, what = f"comb({a}, {i}) * comb({b}, {j})", "Choose each group separately and multiply.", "the number of selections"
        n = k = 0
        given = [f"choose {i} of {a}", f"choose {j} of {b}"]
    question = q.format(n=n, k=k) if "{" in q else q
    use_python = level >= 3
    return Problem(
        question=question, kind=f"combinatorics ({kind})", given=given,
        plan=plan, steps=[Step(what, expr)], code=_py(expr) if use_python else None,
        code_purpose=f"compute {what}", summary=f"{plan} {expr} = {{answer}}.")
