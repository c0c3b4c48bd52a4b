"""The fact drill: it drills exactly the text the problems write."""

import random

from train.synthetic import check_answer, generate
from train.synthetic.chemistry import ATOMIC_MASS, COMPOUNDS, parse_formula
from train.synthetic.conversions import FACT_UNITS, fact_base, make_conversion, unit_fact

LEVELS = (1, 2, 3, 4, 5)


def test_fact_drills_state_the_problems_own_facts_once_each():
    compounds, units = set(), set()
    for level in LEVELS:
        for seed in range(60):
            ex = generate("facts", level=level, seed=seed)
            lines = ex.messages[-1]["reasoning_content"].split("\n")
            assert lines[0] == "Task: recall." and len(lines) - 1 == min(4, 1 + level) == len(set(lines[1:]))
            for line in lines[1:]:
                if line.startswith("1 "):
                    unit = line.split(" ")[1]
                    dim = next(d for d, u in FACT_UNITS if u == unit)
                    assert line == unit_fact(dim, unit) + "." and unit != fact_base(dim)
                    units.add(unit)
                else:
                    formula, masses = line.split(": ", 1)
                    want = [f"{el} = {ATOMIC_MASS[el]} g/mol" for el, _ in parse_formula(formula)]
                    assert masses == "; ".join(dict.fromkeys(want)) + "."
                    compounds.add(formula)
            assert check_answer(ex, ex.messages[-1]["content"])
            assert not ex.tools
    assert compounds == set(COMPOUNDS) and units == {u for _, u in FACT_UNITS}


def test_unit_facts_read_the_same_in_a_drill_and_a_conversion():
    assert unit_fact("data", "GiB") == "1 GiB = 1073741824 B"
    assert unit_fact("speed", "m/s") == "1 m/s = 3.6 km/h"  # km/h is the base: 5/18 m/s never ends
    assert ("length", "m") not in FACT_UNITS and ("length", "mi") in FACT_UNITS
    rng, stated = random.Random(4), set()
    for i in range(300):
        p = make_conversion(rng, 1 + i % 5, "train")
        dim = p.kind.split("(")[1].rstrip(")")
        if dim == "temperature":
            continue
        src, dst = p.given[0].split(" ", 3)[3], p.unit
        for unit in {src, dst} - {fact_base(dim)}:
            assert (dim, unit) in FACT_UNITS and unit_fact(dim, unit) in p.plan, (unit, p.plan)
            stated.add(unit)
    assert stated == {u for _, u in FACT_UNITS}  # the drill asks exactly the facts plans state


def test_word_drills_ask_back_unseen_kinds_of_words_in_every_form():
    """Every form (repeat, reverse, pick, JSON list, snake_case name) writes back the question's
    own words, checked as exact text; no held-out function word is ever one of them."""
    import json

    from train.synthetic.function_pool import HELDOUT_WORDS

    forms = set()
    for level in LEVELS:
        for seed in range(80):
            ex = generate("words", level=level, seed=seed)
            question, answer = ex.messages[1]["content"], ex.meta["answer"]
            given = ex.messages[-1]["reasoning_content"].split("\n")[1].removeprefix("Given: ").rstrip(".")
            words = [part.split(" = ", 1)[1] for part in given.split("; ")]
            assert not {w.lower() for w in words} & HELDOUT_WORDS
            assert all(w in question for w in words)
            if answer.startswith("["):
                forms.add("quote")
                assert json.loads(answer) == words
            elif "_" in answer and " " not in answer:
                forms.add("join")
                assert answer == "_".join(w.lower() for w in words)
            elif ", " in answer:
                forms.add("repeat" if answer.split(", ") == words else "reverse")
                assert answer.split(", ") in (words, words[::-1])
            else:
                forms.add("pick")
                assert answer in words
            assert check_answer(ex, ex.messages[-1]["content"])
            assert not check_answer(ex, ex.messages[-1]["content"].replace(answer, answer + "s", 1))
    assert forms == {"repeat", "reverse", "pick", "quote", "join"}
