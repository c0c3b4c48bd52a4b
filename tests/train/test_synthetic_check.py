"""Answer and tool-call checking, tool schemas, and the disjoint train / held-out function pools."""

import collections
import copy
import json
import re

import jsonschema
import pytest

from train.synthetic import (
    BUILTIN_TOOLS, SUITES, Example, check_answer, check_tool_calls, generate, mixture, parse_tool_calls,
    render_kestrel)
from train.synthetic import lexicon
from train.synthetic.function_calling import is_near_miss
from train.synthetic.function_pool import OBJECTS, PARAMS, VERBS, fresh_word, inflect, invented_word

ALL = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def _number_example(value: str, unit: str, tolerance: float = 1e-6) -> Example:
    answer = f"{value} {unit}".strip() if unit not in ("$", "%") else (f"${value}" if unit == "$" else f"{value}%")
    meta = {"task": "t", "level": 1, "answer": answer, "summary": "s", "split": "train", "tools": True,
            "answer_kind": "number", "tolerance": tolerance, "prompt_len": 2, "unit": unit, "value": value}
    return Example(messages=[], tools=[], meta=meta)


def test_numbers_are_compared_with_tolerance_and_units():
    ex = _number_example("2000", "m")
    assert check_answer(ex, "Answer: 2000 m")
    assert check_answer(ex, "<think>\nlong\n</think>\n\nAnswer: 2,000 meters\nSummary: x")
    assert check_answer(ex, "Answer: 2 km")  # Converted to the expected unit.
    assert check_answer(ex, "Answer: 2000")
    assert not check_answer(ex, "Answer: 2000 kg")  # Wrong dimension.
    assert not check_answer(ex, "Answer: 2001 m")
    assert not check_answer(ex, "no number here")
    temp = _number_example("100", "°C")
    assert check_answer(temp, "Answer: 212 °F") and check_answer(temp, "Answer: 373.15 K")
    assert not check_answer(temp, "Answer: 100 °F")
    money = _number_example("-5.5", "$")
    assert check_answer(money, "Answer: -$5.50") and not check_answer(money, "Answer: $5.50")
    pct = _number_example("12.5", "%")
    assert check_answer(pct, "Answer: 12.5%") and check_answer(pct, "Answer: 12.5 percent")
    loose = _number_example("3.14159265359", "s", tolerance=1e-3)
    assert check_answer(loose, "Answer: 3.1416 s") and not check_answer(loose, "Answer: 3.2 s")


def test_equation_answers_need_every_variable():
    ex = generate("linear_equations", level=5, seed=4)
    final = ex.messages[-1]["content"]
    assert check_answer(ex, final)
    first_only = final.split(",")[0]
    assert not check_answer(ex, first_only)


def test_builtin_and_generated_schemas_are_valid_json_schema():
    for tool in BUILTIN_TOOLS:
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    for ex in mixture(2, ALL, n=40, tasks={t: 1.0 for t in SUITES["tools"]}):
        for tool in ex.tools:
            jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])


def test_every_call_validates_and_matches_itself():
    for ex in mixture(4, ALL, n=400):
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in ex.tools}
        calls = [tc["function"] for m in ex.messages for tc in m.get("tool_calls", [])]
        for call in calls + ex.meta.get("calls", []):
            validator = jsonschema.Draft202012Validator(schemas[call["name"]], format_checker=None)
            assert validator.is_valid(call["arguments"]), call
        if "calls" not in ex.meta:
            continue
        # The rendered final turn, parsed back, is an exact match.
        final_text = "".join(t for t, flag in render_kestrel(ex) if flag)
        first_final = final_text.split("<|im_end|>")[0]
        score = check_tool_calls(ex, first_final)
        assert score["valid"] and score["exact_match"] and score["choice_match"], (score, ex.meta)
        assert score["n_calls"] == len(ex.meta["calls"])


def _example_with_calls(min_args: int = 2) -> Example:
    for seed in range(100):
        ex = generate("fc_single", level=4, seed=seed)
        if len(ex.meta["calls"][0]["arguments"]) >= min_args:
            return ex
    raise AssertionError("no example with enough arguments")


def test_wrong_calls_are_scored_as_wrong():
    ex = _example_with_calls()
    good = copy.deepcopy(ex.meta["calls"])
    assert check_tool_calls(ex, good)["exact_match"]
    reordered = [{"name": good[0]["name"], "arguments": dict(reversed(list(good[0]["arguments"].items())))}]
    assert check_tool_calls(ex, reordered)["exact_match"]
    as_string = [{"function": {"name": good[0]["name"], "arguments": json.dumps(good[0]["arguments"])}}]
    assert check_tool_calls(ex, as_string)["exact_match"]

    unknown = [{"name": "not_offered", "arguments": good[0]["arguments"]}]
    s = check_tool_calls(ex, unknown)
    assert not s["names_offered"] and not s["valid"] and not s["choice_match"] and s["errors"]

    extra = [{"name": good[0]["name"], "arguments": {**good[0]["arguments"], "surprise": 1}}]
    s = check_tool_calls(ex, extra)
    assert s["names_offered"] and not s["schema_valid"] and s["choice_match"] and not s["exact_match"]

    key = next(iter(good[0]["arguments"]))
    changed = copy.deepcopy(good)
    value = changed[0]["arguments"][key]
    changed[0]["arguments"][key] = (not value) if isinstance(value, bool) else (
        value + 1 if isinstance(value, (int, float)) else value + "x")
    s = check_tool_calls(ex, changed)
    assert s["choice_match"] and not s["exact_match"]

    s = check_tool_calls(ex, "<tool_call>\n{not json\n</tool_call>")
    assert not s["parses"] and not s["exact_match"] and s["n_calls"] == 1
    s = check_tool_calls(ex, "")
    assert s["valid"] and not s["choice_match"] and s["n_calls"] == 0
    assert check_tool_calls(ex, good + good)["exact_match"] is False


def test_no_call_examples_expect_no_call():
    ex = generate("fc_none", level=3, seed=1)
    assert ex.meta["calls"] == []
    assert check_tool_calls(ex, ex.messages[-1]["content"])["exact_match"]
    assert check_answer(ex, ex.messages[-1]["content"])
    call = {"name": ex.tools[0]["function"]["name"], "arguments": {}}
    assert not check_tool_calls(ex, [call])["exact_match"]
    assert not check_answer(ex, '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>')


def test_parse_tool_calls_reads_every_block():
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]


def test_train_and_heldout_function_pools_are_disjoint():
    assert not set(VERBS["train"]) & set(VERBS["heldout"])
    assert not set(OBJECTS["train"]) & set(OBJECTS["heldout"])
    assert not {p[0] for p in PARAMS["train"]} & {p[0] for p in PARAMS["heldout"]}

    def names(split):
        fns, params = set(), set()
        for ex in mixture(9, ALL, split, n=300, tasks={t: 1.0 for t in SUITES["tools"]}):
            for t in ex.tools:
                fns.add(t["function"]["name"])
                params |= set(t["function"]["parameters"]["properties"])
        return fns, params

    (train_fns, train_params), (held_fns, held_params) = names("train"), names("heldout")
    assert len(train_fns) > 50 and len(held_fns) > 50
    assert not train_fns & held_fns and not train_params & held_params
    # Half the train words are invented per function (copy, don't memorise); held-out uses its lists.
    listed = {f"{v}_{o}" for v in VERBS["train"] for o in OBJECTS["train"]}
    assert 0.4 < len(train_fns - listed) / len(train_fns) < 0.95
    assert held_fns <= {f"{v}_{o}" for v in VERBS["heldout"] for o in OBJECTS["heldout"]}
    assert train_params - {p[0] for p in PARAMS["train"]} and held_params <= {p[0] for p in PARAMS["heldout"]}


def test_invented_words_are_pronounceable_and_never_held_out():
    import random

    rng = random.Random(0)
    words = [invented_word(rng) for _ in range(3000)]
    held = {w for pool in (VERBS["heldout"], OBJECTS["heldout"]) for name in pool for w in name.split("_")}
    assert not set(words) & held and len(set(words)) > 2500
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 24 for w in words)


def _heldout_vocabulary() -> set[str]:
    words = {w for pool in (VERBS["heldout"], OBJECTS["heldout"]) for name in pool for w in name.split("_")}
    for name, kind, source in PARAMS["heldout"]:
        words |= set(name.split("_")) | ({v.lower() for v in source} if kind == "enum" else set())
    return words


def test_fresh_train_words_mix_made_up_and_english_words_never_held_out():
    import random

    rng = random.Random(1)
    nouns = [fresh_word(rng) for _ in range(3000)]
    verbs = [fresh_word(rng, "verb") for _ in range(3000)]
    held = _heldout_vocabulary()
    assert not (set(nouns) | set(verbs)) & held
    english_nouns = set(nouns) & set(lexicon.NOUNS)
    assert 0.3 < sum(w in english_nouns for w in nouns) / len(nouns) < 0.45  # half English, a third of it inflected
    assert len(english_nouns) > 500 and set(verbs) & set(lexicon.VERBS)
    assert any(w.endswith("s") and w[:-1] in lexicon.NOUNS for w in nouns)
    assert any(w.endswith("ing") for w in verbs) and any(w.endswith("ed") for w in verbs)
    # The lexicon itself holds no held-out word (function_pool also drops any that slip in).
    assert not (set(lexicon.NOUNS) | set(lexicon.VERBS)) & held


@pytest.mark.parametrize("word, part, endings, want", [
    ("box", "noun", None, "boxes"), ("city", "noun", None, "cities"), ("day", "noun", None, "days"),
    ("bake", "verb", "ed", "baked"), ("copy", "verb", "ed", "copied"), ("copy", "verb", "ing", "copying"),
    ("play", "verb", "er", "player"), ("mix", "verb", "s", "mixes"), ("bake", "verb", "ing", "baking")])
def test_inflections_follow_the_plain_spelling_rules(word, part, endings, want):
    import random

    for seed in range(200):  # a verb's ending is drawn: find a seed that draws the one wanted
        got = inflect(word, part, random.Random(seed))
        if endings is None or got.endswith(endings) or got == want:
            break
    assert got == want


@pytest.mark.parametrize("task", SUITES["tools"])
def test_function_calling_examples_offer_one_to_five_functions(task):
    for level in range(1, 6):
        for seed in range(10):
            ex = generate(task, level=level, seed=seed)
            assert 1 <= len(ex.tools) <= 5
            offered = {t["function"]["name"] for t in ex.tools}
            assert all(c["name"] in offered for c in ex.meta["calls"])
            if task == "fc_parallel":
                assert len(ex.meta["calls"]) >= 2


@pytest.mark.parametrize("task", SUITES["tools"])
def test_function_calling_reasoning_copies_the_request_and_the_tool_list_then_looks_up_the_needed_names(task):
    """Each turn's reasoning opens with the action(s) asked for, then the offered names in the tool
    list's order, then the quoted name each action needs and whether it is offered, the same lines
    for a call and a refusal, so the choice between them is the token right after a name that the
    line just above holds or does not."""
    near_misses = 0
    for level in range(1, 6):
        for seed in range(12):
            ex = generate(task, level=level, seed=seed, split="heldout")
            offered = [t["function"]["name"] for t in ex.tools]
            opening = [m["reasoning_content"] for m in ex.messages
                       if m["role"] == "assistant" and (m.get("tool_calls") or task == "fc_none")]
            if opening[-1].startswith("The user asks to repeat "):  # a multi-turn follow-up names the call
                continue
            first_line, offered_line, needed_line, fourth_line = opening[-1].split("\n")[:4]
            assert first_line.startswith("The user asks to ")
            assert offered_line == "Offered: " + ", ".join(f'"{name}"' for name in offered) + "."
            assert needed_line.startswith("Needed: ")
            needed = re.findall(r'"(\w+)" \((offered|not offered)\)', needed_line)
            assert len(needed) == first_line.count(" to ")
            for name, mark in needed:
                verb, obj = name.split("_", 1)
                assert f"to {verb} the {obj.replace('_', ' ')}" in first_line
                assert (mark == "offered") == (name in offered)
            if task == "fc_none":
                assert fourth_line.startswith("None of them can ") and len(needed) == 1
                near_misses += is_near_miss(needed[0][0], offered)
                continue
            assert [n for n, _ in needed] == [c["name"] for c in ex.meta["calls"]]
            assert fourth_line.startswith("1. ")
    if task == "fc_none":
        # 36 of 60: half drawn as near misses plus chance ones (16 of 60 when none are drawn so)
        assert 30 <= near_misses <= 50


def test_lookup_drill_marks_each_needed_name_by_whether_the_tool_list_holds_it():
    """The look-up drill writes the function-calling turn's three opening lines for several actions
    at once, each name marked by membership in the tool list; the unoffered ones mostly near
    misses, so a mark needs the whole name."""
    marks = collections.Counter()
    for level in range(1, 6):
        for seed in range(40):
            ex = generate("lookup", level=level, seed=seed, split=("train", "heldout")[seed % 2])
            offered = [t["function"]["name"] for t in ex.tools]
            first_line, offered_line, needed_line = ex.messages[-1]["reasoning_content"].split("\n")
            assert offered_line == "Offered: " + ", ".join(f'"{name}"' for name in offered) + "."
            needed = re.findall(r'"(\w+)" \((offered|not offered)\)', needed_line)
            assert 1 <= len(needed) <= 6 and len(needed) == first_line.count(" to ")
            assert len({n for n, _ in needed}) == len(needed)
            for name, mark in needed:
                verb, obj = name.split("_", 1)
                assert f"to {verb} the {obj.replace('_', ' ')}" in first_line
                assert (mark == "offered") == (name in offered)
                marks[mark if mark == "offered" else "near" if is_near_miss(name, offered) else "far"] += 1
            hits = [n for n, m in needed if m == "offered"]
            assert ex.meta["answer"] == (", ".join(hits) or "none")
            assert "tool_calls" not in ex.messages[-1]
    total = sum(marks.values())
    assert 0.35 < marks["offered"] / total < 0.55 and marks["near"] > 2 * marks["far"], marks
