"""Eval: the scorer gives 100% to the generator's own answers, 0 to wrong ones, and runs a model."""

import io
import json

import jax
import numpy as np
import pytest

from kestrel.errors import KestrelError
from model import ModelConfig
from model.checkpoint import abstract_params, model_from_params, save_checkpoint
from model.tokenizer import Tokenizer
from train import eval as ev
from train.nano_tokenizer import corpus
from train.synthetic import SUITES, render_kestrel


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_sentencepiece(corpus(200, seed=7), 700)


def scripted(tok, turns):
    """A policy writing the same fixed turns (text) in every conversation."""
    def policy(convs):
        return [tok.encode(turns[min(len(c.rounds), len(turns) - 1)]) for c in convs]
    return policy


@pytest.mark.parametrize("suite,n", [("stem", 10), ("tools", 8)])
def test_the_generators_own_answers_score_100(tok, suite, n):
    result = ev.evaluate(tok, ev.oracle_policy(tok), suite, n=n, seed=1)
    modes = ("tools", "no_tools") if suite == "stem" else ("tools",)
    assert set(result["results"]) == set(modes)
    assert len(result["rows"]) == n * len(modes)
    for mode in modes:
        res = result["results"][mode]
        assert set(res["by_task"]) == set(SUITES[suite])
        assert set(res["by_level"]) <= {"1", "2", "3", "4", "5"} and len(res["by_level"]) >= 2
        overall = res["overall"]
        assert overall["accuracy"] == 1.0 and overall["reasoning_tokens"] > 20
        if mode == "tools":
            assert overall["call_validity"] == overall["call_schema_valid"] == 1.0
            assert overall["calls_per_problem"] >= 0.7
        if suite == "tools":
            assert overall["choice_match"] == overall["exact_match"] == 1.0
    assert all(r["stop"] == "answer" for r in result["rows"])


def test_wrong_answers_score_0(tok):
    wrong = scripted(tok, ["<think>\nI guess.\n</think>\n\nAnswer: purple\nSummary: a guess.<|im_end|>"])
    for suite in ("stem", "tools"):
        result = ev.evaluate(tok, wrong, suite, n=8, seed=2)
        for res in result["results"].values():
            assert res["overall"]["accuracy"] == 0.0
            assert res["overall"]["reasoning_tokens"] == len(tok.encode("\nI guess.\n"))
        if suite == "tools":
            made_no_call = result["results"]["tools"]["by_task"]
            assert made_no_call["fc_single"]["exact_match"] == 0.0
            assert made_no_call["fc_none"]["exact_match"] == 1.0  # no call was the right call


def test_picture_suites_score_how_many_digits_the_read_off_line_gets(tok):
    for suite in ("reading", "vision"):
        result = ev.evaluate(tok, ev.oracle_policy(tok), suite, n=5, seed=1, modes=("tools",))
        assert result["results"]["tools"]["overall"]["read_digits"] == 1.0
    assert "read_digits" not in ev.evaluate(tok, ev.oracle_policy(tok), "tools", n=2, seed=1)["rows"][0]
    (ex, _), = ev.heldout_examples("reading", 1, seed=4)
    digits = "".join(ch for ch in ex.meta["answer"] if ch.isdigit())
    half = digits[: max(1, len(digits) // 2)]
    conv = ev.start(ex, "tools", tok)
    conv.rounds = [f"<think>\nThe image reads: {half}, 9x\nmore {digits}\n</think>\n\nAnswer: {half}"]
    conv.round_ids = [tok.encode(conv.rounds[0])]
    # Only the first line counts; the stray 9 is one more digit than the picture holds.
    row = ev.score(conv, tok)
    got = row["read_digits"]
    assert row["read_line"] == f"The image reads: {half}, 9x"
    assert row["drawn_line"] == f"The image reads: {ex.meta['answer']}"
    matched = len(half) + ("9" in digits[len(half):])  # in order: a later 9 of the picture matches it
    assert got == pytest.approx(2 * matched / (len(digits) + len(half) + 1))


def test_multi_step_transcript_is_the_chat_rendering(tok):
    # The oracle plays a calculator conversation round by round through real tool execution; the
    # final context must be exactly the chat rendering of the whole conversation.
    (with_tools, _), = ev.heldout_examples("stem", 1, seed=3)
    conv = ev.start(with_tools, "tools", tok)
    ev.run_conversations([conv], ev.oracle_policy(tok), tok)
    assert len(conv.rounds) >= 2 and conv.stop == "answer"
    full = "".join(text for text, _ in render_kestrel(with_tools))
    assert tok.decode(conv.context + conv.round_ids[-1]) + "\n" == full


def test_prompts_carry_the_effort_hint(tok):
    (with_tools, _), = ev.heldout_examples("stem", 1, seed=3)
    text = lambda conv: tok.decode(conv.context)  # noqa: E731
    assert "Reasoning effort: low." in text(ev.start(with_tools, "tools", tok, "low"))
    assert text(ev.start(with_tools, "tools", tok, "none")) == text(ev.start(with_tools, "tools", tok))
    (summary, _), = ev.heldout_examples("summary", 1, seed=3)
    assert "Reasoning effort" not in text(ev.start(summary, "tools", tok, "low"))  # written without thinking


def test_auto_prompts_are_rendered_at_the_routers_effort(tok):
    import numpy as np

    from serve.effort import ROUTER_BUCKETS, EffortModel, EffortRouter

    # Both efforts predicted equally right; low predicted cheaper: every problem goes to low.
    tokens = np.zeros((2, ROUTER_BUCKETS + 1))
    tokens[:, -1] = (20, 100)
    router = EffortModel(router=EffortRouter(("low", "high"), np.zeros((2, ROUTER_BUCKETS + 1)), tokens))
    (with_tools, _), = ev.heldout_examples("stem", 1, seed=3)
    conv = ev.start(with_tools, "tools", tok, "auto", router)
    assert conv.effort == "low" and "Reasoning effort: low." in tok.decode(conv.context)
    plain = ev.start(with_tools, "tools", tok, "auto", EffortModel())  # no router: the model's own sizing
    assert plain.effort == "auto" and "Reasoning effort: auto." in tok.decode(plain.context)


def test_tool_calls_are_executed_and_fed_back(tok):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7 + 0.5"}}\n</tool_call><|im_end|>'
    bad = '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call><|im_end|>'
    (ex, _), = ev.heldout_examples("stem", 1, seed=4)
    conv = ev.start(ex, "tools", tok)
    ev.run_conversations([conv], scripted(tok, [call, bad, "Answer: 1<|im_end|>"]), tok)
    text = tok.decode(conv.context)
    assert "<tool_response>\n42.5\n</tool_response>" in text
    assert "<tool_response>\nerror: 'weather' is not an available function\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n") and len(conv.rounds) == 3
    row = ev.score(conv, tok)
    assert row["n_calls"] == 2 and row["calls_valid"] is False
    assert row["calls_parse"] and not row["calls_name_offered"]
    # A step limit ends a model that never stops calling.
    conv = ev.start(ex, "tools", tok)
    ev.run_conversations([conv], scripted(tok, [call]), tok, max_rounds=3)
    assert conv.stop == "rounds" and len(conv.rounds) == 3


@pytest.fixture(scope="module")
def tiny_ckpt(tok, tmp_path_factory):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=2048)
    # Random weights straight into the abstract tree: eager init_model costs ~10 s on 2 cores.
    rng = np.random.default_rng(0)

    def fill(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(s.shape, s.dtype)
        return (rng.normal(0, 0.05, s.shape)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(fill, abstract_params(cfg))
    return save_checkpoint(model_from_params(cfg, params), tmp_path_factory.mktemp("ck") / "tiny", tokenizer=tok)


def test_run_eval_on_a_tiny_random_model(tiny_ckpt):
    out = io.StringIO()
    result = ev.run_eval(str(tiny_ckpt), "stem", n=3, seed=0, max_new_tokens=8, json=True, batch_size=8,
                         out=out)
    assert json.loads(out.getvalue())["results"] == result["results"]
    assert len(result["rows"]) == 6 and result["seconds"] > 0
    for mode in ("tools", "no_tools"):
        overall = result["results"][mode]["overall"]
        assert 0.0 <= overall["accuracy"] <= 1.0 and overall["n"] == 3
        assert 1 <= overall["generated_tokens"] <= 8 * 8
    table = ev.format_table(result)
    assert "[no_tools] all" in table and "arithmetic" in table and "level 1" in table


def test_engine_and_generator_decode_alike(tiny_ckpt):
    """Plain greedy decoding through the engine's raw requests equals the offline generator's,
    turn for turn (tool rounds included)."""
    by = {d: ev.run_eval(str(tiny_ckpt), "stem", n=3, seed=1, max_new_tokens=12, batch_size=4,
                         decoder=d, out=None) for d in ("engine", "generator")}
    assert [r["generated_tokens"] for r in by["engine"]["rows"]] == \
        [r["generated_tokens"] for r in by["generator"]["rows"]]
    assert by["engine"]["results"] == by["generator"]["results"]
    assert by["engine"]["decoding"] == "greedy, engine (raw)"


def test_bad_arguments_are_user_errors(tiny_ckpt, tmp_path):
    with pytest.raises(KestrelError, match="suite"):
        ev.heldout_examples("poetry", 3)
    with pytest.raises(KestrelError, match=">= 1"):
        ev.heldout_examples("stem", 0)
    with pytest.raises(KestrelError, match="not a Kestrel checkpoint"):
        ev.run_eval(str(tmp_path), "stem", n=1, out=None)
    with pytest.raises(KestrelError, match="--early-exit needs --constrained"):
        ev.run_eval(str(tiny_ckpt), "stem", n=1, early_exit=0.9, out=None)
    with pytest.raises(KestrelError, match="--kv-cache-dtype needs the engine decoder"):
        ev.run_eval(str(tiny_ckpt), "stem", n=1, kv_cache_dtype="int8", decoder="generator", out=None)
    with pytest.raises(KestrelError, match="cannot use --decoder generator"):
        ev.run_eval(str(tiny_ckpt), "stem", n=1, constrained=True, decoder="generator", out=None)
    with pytest.raises(KestrelError, match="no exit_layers"):
        ev.run_eval(str(tiny_ckpt), "stem", n=1, early_exit=0.9, constrained=True, out=None)


def test_engine_policy_constrains_every_call_to_the_offered_schemas(tok, tiny_ckpt):
    from model.checkpoint import load_checkpoint
    from serve.engine import Engine

    model, tokenizer = load_checkpoint(str(tiny_ckpt))
    engine = Engine(model, tokenizer, num_pages=512, page_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    # A random model calls functions only because tool_choice=required leaves no other way; the
    # grammar then makes every call parse, name an offered function and satisfy its schema.
    # (A random model may ramble inside a string argument until max_new_tokens: such a turn ends
    # "length" with an unfinished call, which is not parsed; the calls it completed before count.)
    policy = ev.engine_policy(engine, max_new_tokens=300, effort="none", tool_choice="required")
    result = ev.evaluate(tokenizer, policy, "tools", n=12, seed=3, max_rounds=1)
    called = [r for r in result["rows"] if "calls_valid" in r]
    assert len(called) >= 2, result["rows"]
    assert all(r["calls_valid"] for r in called), called
    assert engine.kv.pool.num_used == 0


def test_effort_calibration_writes_budgets_router_and_table(tiny_ckpt, tmp_path):
    from serve.effort import EffortModel
    from train.effort_calibration import calibrate

    out = tmp_path / "effort.json"
    record = calibrate(str(tiny_ckpt), n=3, eval_n=1, max_new_tokens=12, out=str(out))
    b = record["budgets"]
    assert 16 <= b["low"] < b["medium"] < b["high"] and all(v % 16 == 0 for v in b.values())
    # Kestrel's template reads reasoning_effort: each effort was played with its hint, and auto is
    # a router (set by cross-validation), shown beside the model's own sizing.
    assert set(record["table"]) == {"low", "medium", "high", "auto", "auto_own_sizing"}
    cal = record["calibration"]
    assert cal["heeds_effort"] is True
    assert set(cal["reasoning_tokens_per_turn_by_effort"]) == {"low", "medium", "high", "auto"}
    assert all(v["turns"] >= 6 for v in cal["reasoning_tokens_per_turn_by_effort"].values())
    assert cal["router"]["chosen"] in cal["router"]["cross_validated"]
    loaded = EffortModel.load(tiny_ckpt)
    assert loaded.budgets == b and loaded.probe is None
    assert loaded.router.efforts == ("low", "medium", "high", "auto")
    assert loaded.route([{"role": "user", "content": "What is 2 + 2?"}]) in loaded.router.efforts
    assert json.loads(out.read_text())["table"] == record["table"]


def test_effort_calibration_fits_the_probe_for_a_model_that_ignores_the_hint(tiny_ckpt, monkeypatch):
    from serve.effort import EffortModel
    from train import effort_calibration

    monkeypatch.setattr(effort_calibration, "heeds_effort", lambda tokenizer: False)
    record = effort_calibration.calibrate(str(tiny_ckpt), n=3, eval_n=1, max_new_tokens=12)
    assert set(record["table"]) == {"low", "medium", "high", "auto"}
    assert set(record["calibration"]["reasoning_tokens_per_turn_by_effort"]) == {"high"}
    loaded = EffortModel.load(tiny_ckpt)
    assert loaded.router is None and loaded.probe.weights.shape == (32,)


@pytest.mark.slow  # 14 s cold: a benchmark's smoke test (bench/effort_budgets.py)
def test_effort_budgets_bench_runs_every_effort_within_its_budget(tiny_ckpt, tmp_path):
    from bench.effort_budgets import main
    from serve.effort import EffortModel

    EffortModel({"low": 16, "medium": 32, "high": 48}).save(tiny_ckpt)
    out = tmp_path / "budgets.json"
    assert main([str(tiny_ckpt), "--n", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["max_tokens"] == 48 + 256 and set(result["efforts"]) == {"low", "medium", "high", "auto"}
    for effort, budget in (("low", 16), ("medium", 32), ("high", 48), ("auto", 32)):  # auto: medium, no router
        for suite in ("stem", "tools"):
            row = result["efforts"][effort][suite]
            assert row["turns"] == 2 and row["reasoning_tokens_max"] <= budget
            assert 0 <= row["closed_by_handoff"] <= row["reasoning_closed"] <= 1
            assert sum(row["finish_reasons"].values()) == 2
