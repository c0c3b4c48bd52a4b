"""The fact and lookup drills: they drill exactly the text the problems and calls write."""

import re

from train.synthetic import check_answer, generate
from train.synthetic.chemistry import ATOMIC_MASS, COMPOUNDS, parse_formula
from train.synthetic.conversions import FACT_UNITS, fact_base, unit_fact
from train.synthetic.function_calling import NOT_OFFERED
from train.synthetic.function_pool import _HELDOUT_WORDS

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


def test_lookup_drills_name_an_offered_function_or_none_of_them():
    found = missed = near = 0
    for level in LEVELS:
        for seed in range(80):
            ex = generate("fc_lookup", level=level, seed=seed, split="train")
            offered = {t["function"]["name"] for t in ex.tools}
            asked = re.findall(r"^\d+\. (.+)$", ex.messages[1]["content"], re.M)
            lines = ex.messages[-1]["reasoning_content"].split("\n")[1:]
            assert len(asked) == len(lines) == len(ex.meta["answer"].split("; ")) >= 2
            for action, line, answer in zip(asked, lines, ex.meta["answer"].split("; ")):
                name = "_".join(w for w in action.split(" ") if w != "the")
                verb, obj = action.split(" the ")
                assert line.endswith(f"{action} -> {name if name in offered else NOT_OFFERED}")
                assert answer == (name if name in offered else "none")
                if name in offered:
                    found += 1
                else:
                    missed += 1
                    near += any(n.startswith(verb + "_") or n.endswith("_" + obj) for n in offered)
                assert not set(re.split(r"[ _]", action)) & _HELDOUT_WORDS
            assert check_answer(ex, ex.messages[-1]["content"])
    assert 0.4 < found / (found + missed) < 0.6, (found, missed)
    assert near / missed > 0.6, (near, missed)  # most misses share a word with an offered function


def test_a_refusal_decides_where_a_call_does():
    """A single call's reasoning and a refusal's read alike up to "<action> ->": what follows is
    the offered name or "none of the offered functions", the step the lookup drill trains."""
    for seed in range(20):
        call = generate("fc_single", level=2, seed=seed, split="train").messages[2]["reasoning_content"]
        refusal = generate("fc_none", level=2, seed=seed, split="train").messages[2]["reasoning_content"]
        head = "The user asks for 1 thing.\n1. "
        assert call.startswith(head) and refusal.startswith(head)
        assert re.match(r"1\. .+ -> \w+ with ", call.split("\n")[1])
        assert re.fullmatch(rf"1\. .+ -> {NOT_OFFERED}", refusal.split("\n")[1])
