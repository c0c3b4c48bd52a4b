"""Effort-conditioned examples: the system turn says the effort, the reasoning is as long as it asks,
and the calls and answers are the same at every effort."""

import pytest

from model.chat_template import KESTREL_TEMPLATE, ChatTemplate, effort_line
from train.synthetic import SUITES, check_answer, generate, mixture, render_kestrel
from train.synthetic.problem import EFFORTS, trace_depth

ALL = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def reasoning(example) -> list[str]:
    return [m.get("reasoning_content", "") for m in example.messages if m["role"] == "assistant"]


def calls(example) -> list:
    return [m.get("tool_calls") for m in example.messages if m["role"] == "assistant"]


@pytest.mark.parametrize("task", SUITES["stem"])
@pytest.mark.parametrize("tools", [True, False])
def test_reasoning_shrinks_with_the_effort_and_the_work_stays_the_same(task, tools):
    for level in (1, 3, 5):
        plain = generate(task, level=level, seed=40 + level, tools=tools)
        by_effort = {e: generate(task, level=level, seed=40 + level, tools=tools, effort=e) for e in EFFORTS}
        high, medium, low = by_effort["high"], by_effort["medium"], by_effort["low"]
        # high writes the whole scheme, as an example without a hint does.
        assert reasoning(high) == reasoning(plain)
        first = {e: reasoning(x)[0] for e, x in by_effort.items()}
        assert "Task:" in first["high"] and "Task:" not in first["medium"] and "Plan:" in first["medium"]
        assert "Plan:" not in first["low"] and "Given:" not in first["low"]
        if tools:
            assert not any("returned" in r or "printed" in r for r in reasoning(low))
        lengths = [sum(map(len, reasoning(x))) for x in (low, medium, high)]
        assert lengths[0] < lengths[1] < lengths[2]
        # auto writes what the level needs.
        depth = trace_depth("auto", level)
        assert reasoning(by_effort["auto"]) == reasoning(
            {"steps": low, "plan": medium, "full": high}[depth])
        for e, x in by_effort.items():
            assert calls(x) == calls(plain)
            assert x.messages[-1]["content"] == plain.messages[-1]["content"]
            assert x.meta["effort"] == e and x.meta["answer"] == plain.meta["answer"]
            assert x.messages[0]["content"] == plain.messages[0]["content"] + "\n" + effort_line(e)
            assert check_answer(x, x.messages[-1]["content"])


def test_the_training_text_is_what_the_template_renders_for_the_effort():
    template = ChatTemplate(KESTREL_TEMPLATE)
    for task in ("word_problems", "fc_single", "fc_none"):
        for effort in EFFORTS:
            plain = generate(task, level=3, seed=7)
            hinted = generate(task, level=3, seed=7, effort=effort)
            text = "".join(s for s, _ in render_kestrel(hinted))
            prompt = template.render(plain.prompt_messages(), tools=plain.tools or None,
                                     add_generation_prompt=True, reasoning_effort=effort)
            assert text.startswith(prompt)
            if task.startswith("fc"):  # function calling keeps its reasoning at every effort
                assert reasoning(hinted) == reasoning(plain)


def test_a_mixture_with_efforts_draws_them_apart_from_the_rest():
    mix = {None: 1.0, "low": 1.0, "high": 2.0}
    with_efforts = list(mixture(5, ALL, n=300, efforts=mix))
    without = list(mixture(5, ALL, n=300))
    assert with_efforts == list(mixture(5, ALL, n=300, efforts=mix))  # deterministic
    drawn = [e.meta.get("effort") for e in with_efforts]
    for a, b in zip(with_efforts, without):
        # Same task, level, tools and answer: only the hint and the reasoning differ.
        assert {k: v for k, v in a.meta.items() if k != "effort"} == b.meta
        if a.meta["task"] in SUITES["summary"] + SUITES["drill"]:
            assert "effort" not in a.meta and a == b
    hinted = [d for d, e in zip(drawn, with_efforts) if e.meta["task"] in SUITES["stem"] + SUITES["tools"]]
    assert set(hinted) == {None, "low", "high"}
    assert 0.4 < hinted.count("high") / len(hinted) < 0.6


def test_bad_efforts_are_refused():
    with pytest.raises(ValueError, match="effort"):
        generate("arithmetic", level=1, seed=0, effort="extreme")
    with pytest.raises(ValueError, match="takes no reasoning effort"):
        generate("summarize", level=1, seed=0, effort="low")
    with pytest.raises(ValueError, match="unknown effort"):
        next(mixture(0, ALL, efforts={"max": 1.0}))
    with pytest.raises(ValueError, match="positive sum"):
        next(mixture(0, ALL, efforts={"low": 0.0}))
