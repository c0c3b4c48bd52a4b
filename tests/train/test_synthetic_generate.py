"""The synthetic generator: determinism, coverage of every task and level, real tool outputs."""

import json
import random
import re

import pytest

from serve.tools import calculate
from train.synthetic import SUITES, TASKS, TEXT_TASKS, check_answer, generate, mixture, mixture_at, run_python

LEVELS = (1, 2, 3, 4, 5)
ALL = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def _variants():
    for task, spec in TASKS.items():
        if spec.suite == "summary":
            continue  # test_summary_examples_summarise_a_stem_reasoning
        if spec.suite in ("drill", "reading"):
            yield task, task == "lookup"  # the look-up drill is about an offered tool list
            continue
        for tools in ((True, False) if spec.suite == "stem" else (True,)):
            yield task, tools


@pytest.mark.parametrize("task, tools", list(_variants()))
def test_every_task_at_every_level_generates_a_consistent_example(task, tools):
    for level in LEVELS:
        for seed in range(12):
            split = ("train", "heldout")[seed % 2]
            ex = generate(task, level=level, seed=seed, split=split, tools=tools)
            m = ex.meta
            assert (m["task"], m["level"], m["split"], m["tools"]) == (task, level, split, tools)
            assert m["summary"] and "\n" not in m["summary"]
            roles = [msg["role"] for msg in ex.messages]
            assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "assistant"
            assert ex.messages[m["prompt_len"] - 1]["role"] == "user"
            assert ex.messages[m["prompt_len"]]["role"] == "assistant"
            for msg in ex.messages:
                if msg["role"] == "assistant":
                    assert msg["reasoning_content"].strip(), "every assistant message thinks first"
            final = ex.messages[-1]["content"]
            lines = final.split("\n")
            assert lines[0] == f"Answer: {m['answer']}" and lines[1] == f"Summary: {m['summary']}"
            assert check_answer(ex, final), (task, level, seed, final)
            assert bool(ex.tools) == tools
            if not tools:
                assert len(ex.messages) == 3 and "tool_calls" not in ex.messages[-1]


def test_summary_examples_summarise_a_stem_reasoning():
    from serve.summaries import SUMMARY_REQUEST, summary_messages
    from train.synthetic.render import render_kestrel

    partial = 0
    for level in LEVELS:
        for seed in range(20):
            ex = generate("summarize", level=level, seed=seed)
            system, user, answer = ex.messages
            reasoning = user["content"][len(SUMMARY_REQUEST):]
            assert [system, user] == summary_messages(reasoning) and ex.tools == []
            assert answer == {"role": "assistant", "content": ex.meta["answer"], "reasoning_content": ""}
            assert reasoning.startswith("Task: ") and "\n" not in ex.meta["answer"]
            partial += ex.meta["answer"].startswith(("Planned: ", "Asked "))
            # Written without thinking: the empty think block is trained, then the line itself.
            text, trainable = render_kestrel(ex)[-2]  # then the untrained newline after <|im_end|>
            assert trainable and text == "<think>\n\n</think>\n\n" + ex.meta["answer"] + "<|im_end|>"
            said = text.removesuffix("<|im_end|>")  # eval scores a turn without its stop token
            assert check_answer(ex, said) and not check_answer(ex, said + " more")
    assert 0.1 < partial / 100 < 0.4


def test_generation_is_deterministic_per_seed():
    for task in TASKS:
        for level in LEVELS:
            a = generate(task, level=level, seed=1234 + level)
            b = generate(task, level=level, seed=1234 + level)
            assert a == b
    assert [e.messages for e in mixture(7, ALL, n=40)] == [e.messages for e in mixture(7, ALL, n=40)]
    assert [e.messages for e in mixture(7, ALL, n=20)] != [e.messages for e in mixture(8, ALL, n=20)]


def test_mixture_index_is_resumable_and_respects_weights():
    tasks = {name: 1.0 for name in TEXT_TASKS}  # the default mix: image tasks need a vision tower
    stream = list(mixture(3, {2: 1.0, 4: 3.0}, "heldout", n=400))
    assert not any(e.images for e in stream)
    assert stream[123] == mixture_at(3, 123, {2: 1.0, 4: 3.0}, "heldout", tasks, 0.8)
    levels = [e.meta["level"] for e in stream]
    assert set(levels) == {2, 4} and 0.6 < levels.count(4) / len(levels) < 0.9
    assert all(e.meta["split"] == "heldout" for e in stream)
    stem = [e for e in stream if e.meta["task"] in SUITES["stem"]]
    share = sum(e.meta["tools"] for e in stem) / len(stem)
    assert 0.65 < share < 0.95
    only = list(mixture(3, {1: 1}, n=30, tasks={"physics": 1.0}, tools_fraction=0.0))
    assert all(e.meta["task"] == "physics" and not e.meta["tools"] for e in only)


def test_every_tool_output_equals_rerunning_the_tool():
    checked = {"calculator": 0, "python": 0}
    for ex in mixture(11, ALL, n=600):
        calls = {tc["id"]: tc["function"] for m in ex.messages for tc in m.get("tool_calls", [])}
        for m in ex.messages:
            if m["role"] != "tool":
                continue
            fn = calls[m["tool_call_id"]]
            if fn["name"] == "calculator":
                assert m["content"] == calculate(fn["arguments"]["expression"])
            elif fn["name"] == "python":
                assert m["content"] == run_python(fn["arguments"]["code"])
            else:
                assert isinstance(json.loads(m["content"])["result"], str)
                continue
            checked[fn["name"]] += 1
    assert checked["calculator"] > 100 and checked["python"] > 10


def test_stem_answers_are_copied_from_the_last_tool_output():
    for task in SUITES["stem"]:
        for level in LEVELS:
            ex = generate(task, level=level, seed=level)
            last_tool = [m for m in ex.messages if m["role"] == "tool"][-1]["content"]
            assert last_tool in ex.meta["answer"]


def test_check_answer_rejects_a_wrong_answer_for_every_task():
    rng = random.Random(0)
    for ex in mixture(5, ALL, n=300):
        final = ex.messages[-1]["content"]
        kind = ex.meta["answer_kind"]
        if kind == "refusal":
            wrong = "Answer: Sure, done."
        elif kind == "summary":
            wrong = final.rstrip(".") + " and more."
        elif kind == "results":
            wrong = re.sub(r"-\d+", lambda mt: f"-{int(mt.group(0)[1:]) + 1}", final)
        elif kind == "text" and not re.search(r"\d", ex.meta["answer"]):  # the word drill's words
            wrong = final.replace(ex.meta["answer"], ex.meta["answer"] + "s", 1)
        else:
            # Shift the first number of the answer line well outside any tolerance.
            head, _, tail = final.partition("\n")
            m = re.search(r"-?\d+(?:\.\d+)?", head)
            bumped = str(float(m.group(0)) * 1.5 + rng.randint(1, 9))
            wrong = head[: m.start()] + bumped + head[m.end():] + "\n" + tail
        assert not check_answer(ex, wrong), (ex.meta["task"], final, wrong)


def test_no_tools_variant_computes_in_reasoning():
    ex = generate("arithmetic", level=3, seed=2, tools=False)
    reasoning = ex.messages[-1]["reasoning_content"]
    ops = [ln for ln in reasoning.splitlines() if re.fullmatch(r"\S+ [-+*/%]{1,2} \S+ = \S+", ln)]
    assert ops, reasoning
    for line in ops:  # Each written operation is right.
        lhs, rhs = line.split(" = ")
        assert calculate(lhs) == rhs


def test_python_tool_captures_output_and_restricts_the_namespace():
    assert run_python("import math\nprint(math.comb(5, 2))\nprint('a', 1, sep='-')") == "10\na-1"
    with pytest.raises(ValueError, match="not available"):
        run_python("import os\nprint(os.getcwd())")
    with pytest.raises(ValueError, match="NameError"):
        run_python("open('/etc/passwd')")
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        run_python("print(1 / 0)")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"task": "nope", "level": 1, "seed": 0}, "unknown task"), ({"level": 0, "seed": 0}, "level"),
     ({"level": 6, "seed": 0}, "level"), ({"level": 1, "seed": 0, "split": "test"}, "split"),
     ({"level": 1}, "rng or seed"), ({"task": "fc_single", "level": 1, "seed": 0, "tools": False}, "tools=True")],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)


def test_bad_mixture_arguments_are_refused():
    with pytest.raises(ValueError, match="levels"):
        next(mixture(0, {}))
    with pytest.raises(ValueError, match="unknown task"):
        next(mixture(0, {1: 1}, tasks={"nope": 1}))


@pytest.mark.slow
def test_generation_throughput():
    import time

    best = 0.0
    for _ in range(3):  # Best of three: the machine is shared.
        start = time.perf_counter()
        n = sum(1 for _ in mixture(0, ALL, n=3000))
        best = max(best, n / (time.perf_counter() - start))
    assert best > 1000, f"{best:.0f} examples/s"


def test_copy_drills_ask_back_every_number_at_every_level():
    kinds = set()
    for level in LEVELS:
        for seed in range(200):  # enough draws to ask for every position of the longest lists
            ex = generate("copy", level=level, seed=seed)
            question, answer = ex.messages[1]["content"], ex.meta["answer"]
            assert all(part in question for part in answer.split(", "))
            assert check_answer(ex, ex.messages[-1]["content"])
            kinds.add(question.split()[0])
    assert len(kinds) >= 4


def test_unit_conversions_state_one_fact_per_unit():
    """A conversion's plan names each unit's factor to its dimension's base, the same text in every
    problem (n facts per dimension to learn, not one per pair of units), and its expression is them."""
    from serve.tools import evaluate
    from train.synthetic.conversions import fact_base, make_conversion
    from train.synthetic.quantities import UNITS, convert, parse_number

    facts: dict[str, set[str]] = {}
    rng = random.Random(3)
    for i in range(400):
        p = make_conversion(rng, 1 + i % 5, "train")
        if "temperature" in p.kind:
            continue
        stated = re.findall(r"1 (\S+) = ([\d.]+) (\S+?)(?=[ ,])", p.plan)
        assert stated, p.plan
        for unit, factor, base in stated:
            dim = p.kind.split("(")[1].rstrip(")")
            assert base == fact_base(dim) and unit in UNITS[dim]
            facts.setdefault(unit, set()).add(factor)
        value = p.given[0].split(" = ")[1]
        src, dst = value.split(" ", 1)[1], p.unit
        want = convert(parse_number(value.split(" ")[0]), src, dst)
        assert abs(evaluate(p.steps[0].expression) - want) <= abs(want) * 1e-9
    assert len(facts) >= 25 and all(len(f) == 1 for f in facts.values()), facts
