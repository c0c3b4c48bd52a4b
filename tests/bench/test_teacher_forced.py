"""bench/teacher_forced.py: token kinds are told apart as documented, and a run over the
bundled kestrel-nano scores every kind it meets with counts that add up."""

from pathlib import Path

import pytest

from bench.teacher_forced import TASKS, calls_right, kinds, measure

ROOT = Path(__file__).resolve().parents[2]


def test_token_kinds():
    ids = [5, 7, 9, 7, 11, 12, 5, 7, 11, 7, 9, 11, 40]
    pieces = ["a", "345", " the", "345", " of", " 12", "a", "345", "$3.5", "345", " the", " of", "x"]
    assert kinds(pieces, ids) == [
        "number_new", "text_new", "number_start", "text_new", "number_new",  # 7 9 7 11 12
        "text_start", "number_induction",  # 5 (seen, never after 12); 7 (5 was followed by 7)
        "number_induction", "number_start",  # 7 was followed by 11 before; 7 never after 11
        "text_induction", "text_start", "text_new",  # 9 after 7 before; 11 never after 9
    ]


def test_a_call_counts_only_when_every_token_of_it_is_right():
    o, c = 90, 91  # <tool_call>, </tool_call>
    ids = [1, o, 5, 6, c, 2, o, 7, c, 3, o, 8]  # two whole calls, then one cut off
    trainable = [False] + [True] * (len(ids) - 1)
    exact = ids[1:]  # the prediction at t is ids[t + 1]
    assert calls_right(ids, trainable, exact, o, c) == [True, True]
    wrong = list(exact)
    wrong[6] = 0  # the 7 inside the second call
    assert calls_right(ids, trainable, wrong, o, c) == [True, False]
    wrong[2] = 0  # and the 5 inside the first
    assert calls_right(ids, trainable, wrong, o, c) == [False, False]
    prompt_call = [False] * 6 + [True] * (len(ids) - 6)  # the first call is prompt text: not scored
    assert calls_right(ids, prompt_call, exact, o, c) == [True]


@pytest.mark.slow  # 15 s cold: a benchmark's smoke test; the token kinds and whole-call counts are tested above
def test_bundled_model_is_scored():
    n = len(TASKS)
    result = measure(str(ROOT / "checkpoints" / "kestrel-nano"), n)
    kinds = result["accuracy_by_kind"]
    assert {"number_induction", "text_new"} <= set(kinds)
    assert all(0 <= row["right"] <= row["tokens"] and row["tokens"] > 0 for row in kinds.values())
    assert set(result["by_task"]) == set(TASKS)
    assert all(0 <= row["token_accuracy"] <= 1 for row in result["by_task"].values())
    calls = {t: row["calls"] for t, row in result["by_task"].items() if "calls" in row}
    assert {"fc_single", "fc_parallel"} <= set(calls) and "fc_none" not in calls  # STEM calls its tools too
    assert all(n >= 1 for n in calls.values())
    assert all(0 <= result["by_task"][t]["calls_all_right"] <= 1 for t in calls)
