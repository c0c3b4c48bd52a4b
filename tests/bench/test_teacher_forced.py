"""bench/teacher_forced.py: token kinds are told apart as documented, and a run over the
bundled kestrel-nano scores every kind it meets with counts that add up."""

from pathlib import Path

from bench.teacher_forced import TASKS, kind_of, measure

ROOT = Path(__file__).resolve().parents[2]


def test_token_kinds():
    earlier = [5, 7, 9, 7, 11]
    assert kind_of(" 12", 12, earlier, 9) == "number_new"
    assert kind_of("345", 7, earlier, 5) == "number_induction"  # 5 was followed by 7 before
    assert kind_of("$3.5", 7, earlier, 11) == "number_start"  # 7 occurred, never after 11
    assert kind_of(" the", 9, earlier, 7) == "text_induction"
    assert kind_of(" the", 11, earlier, 5) == "text_start"
    assert kind_of("x", 40, earlier, 5) == "text_new"


def test_bundled_model_is_scored():
    n = len(TASKS)
    result = measure(str(ROOT / "checkpoints" / "kestrel-nano"), n)
    kinds = result["accuracy_by_kind"]
    assert {"number_induction", "text_new"} <= set(kinds)
    assert all(0 <= row["right"] <= row["tokens"] and row["tokens"] > 0 for row in kinds.values())
    assert set(result["by_task"]) == set(TASKS)
    assert all(0 <= row["token_accuracy"] <= 1 for row in result["by_task"].values())
