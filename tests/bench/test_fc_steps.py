"""bench/fc_steps.py: a first turn written as the reference is right at every step, a turn that
declines a request it should call (or miscopies the action or the tool list) is wrong at that
step only, and a run over the bundled kestrel-nano reports every step as a rate."""

import json
import re
from pathlib import Path

from bench.fc_steps import TASKS, decision_positions, measure, score_turn
from model.tokenizer import Tokenizer
from train.packing import tokenize_segments
from train.synthetic import render_kestrel
from train.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]


def _turn(reasoning: str, calls: list[dict]) -> str:
    text = f"<think>\n{reasoning}\n</think>\n\n"
    return text + "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


def test_the_reference_turn_is_right_at_every_step():
    ex = generate("fc_single", level=3, seed=4, split="heldout")
    calls = [{"name": c["name"], "arguments": c["arguments"]} for c in ex.meta["calls"]]
    assert score_turn(ex, _turn(ex.messages[2]["reasoning_content"], calls)) == {
        "action": True, "offered": True, "needed": True, "called": True, "name": True}
    none = generate("fc_none", level=3, seed=4, split="heldout")
    assert score_turn(none, _turn(none.messages[2]["reasoning_content"], [])) == {
        "action": True, "offered": True, "needed": True, "called": False}


def test_a_wrong_step_is_scored_where_it_goes_wrong():
    ex = generate("fc_single", level=2, seed=1, split="heldout")
    lines = ex.messages[2]["reasoning_content"].split("\n")
    declined = "\n".join([lines[0], lines[1], lines[2].replace("(offered)", "(not offered)"), "So I make no call."])
    assert score_turn(ex, _turn(declined, [])) == {
        "action": True, "offered": True, "needed": False, "called": False, "name": False}
    unlisted = "\n".join([lines[0], "Offered: none."] + lines[2:])
    assert score_turn(ex, _turn(unlisted, [])) == {
        "action": True, "offered": False, "needed": True, "called": False, "name": False}
    miscopied = "\n".join([lines[0].replace(" the ", " a ", 1)] + lines[1:])
    wrong_name = [{"name": "no_such_function", "arguments": {}}]
    assert score_turn(ex, _turn(miscopied, wrong_name)) == {
        "action": False, "offered": True, "needed": True, "called": True, "name": False}


def test_the_look_up_is_the_token_after_each_needed_name():
    tokenizer = Tokenizer.load(ROOT / "checkpoints" / "kestrel-nano")
    for task, level in (("fc_single", 2), ("fc_none", 2), ("fc_parallel", 3), ("lookup", 5)):
        ex = generate(task, level=level, seed=3, split="heldout")
        enc = tokenize_segments(tokenizer, render_kestrel(ex))
        ids = [int(t) for t in enc.ids]
        positions = decision_positions(tokenizer, ids, enc.trainable)
        needed = re.findall(r'"(\w+)" \((offered|not offered)\)', ex.messages[2]["reasoning_content"].split("\n")[2])
        assert len(positions) == len(needed) >= 1
        for k, (name, mark) in zip(positions, needed):
            assert tokenizer.id_to_token(ids[k]) == ("of" if mark == "offered" else "not") and enc.trainable[k]
            assert tokenizer.decode(ids[:k]).endswith(f'"{name}" (')
    stem = generate("arithmetic", level=1, seed=0, split="heldout")
    enc = tokenize_segments(tokenizer, render_kestrel(stem))
    assert decision_positions(tokenizer, [int(t) for t in enc.ids], enc.trainable) == []


def test_bundled_model_is_scored():
    result = measure(str(ROOT / "checkpoints" / "kestrel-nano"), n=2, max_new_tokens=4)
    for task in TASKS:
        assert all(v is None or 0 <= v <= 1 for k, v in result[task].items() if k != "n_near_miss")
    assert "name" in result["fc_single"] and 0 <= result["choice_right"] <= 1
    assert set(result["lookup"]) == {f"{s}_{t}" for s in ("heldout", "train")
                                     for t in (*TASKS, "drill_offered", "drill_not_offered")}
    assert all(v is None or 0 <= v <= 1 for v in result["lookup"].values())
