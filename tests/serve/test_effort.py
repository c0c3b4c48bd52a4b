"""Reasoning effort: the probe and the router fit what they should, the file round-trips, the
engine's ``effort="auto"`` takes its budget from the prompt's last hidden state after prefill
(probe) or its effort from the last user message before rendering (router)."""

import json

import numpy as np
import pytest

from serve import events as ev
from serve.effort import (EffortModel, EffortProbe, EffortRouter, fit_probe, fit_router, last_user_text,
                          prompt_words)
from serve.engine import EngineRequest
from serve.request import SamplingParams
from test_engine import make_engine, tiny_tokenizer

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def test_probe_recovers_a_linear_log_length():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    w = rng.normal(size=16) * 0.3
    tokens = np.expm1(x @ w + 3.0)
    probe = fit_probe(x, tokens, l2=1e-3, margin=1.0, slack=0, min_budget=1, max_budget=10_000)
    pred = np.array([probe.predict_tokens(h) for h in x[:20]])
    np.testing.assert_allclose(pred, tokens[:20], rtol=1e-3)
    assert probe.budget(x[0]) == round(tokens[0])
    with pytest.raises(ValueError, match="expects 16"):
        probe.predict_tokens(np.zeros(15))


def test_effort_file_round_trips_and_bad_files_are_refused(tmp_path):
    assert EffortModel.load(tmp_path).probe is None  # no file: the default table
    model = EffortModel({"low": 32, "medium": 64, "high": 128},
                        EffortProbe(np.arange(4, dtype=np.float32), 1.5, 1.2, 4, 16, 128))
    model.save(tmp_path, {"turns": 3})
    back = EffortModel.load(tmp_path)
    assert back.budgets == model.budgets and back.probe.bias == 1.5
    np.testing.assert_array_equal(back.probe.weights, model.probe.weights)
    (tmp_path / "effort.json").write_text(json.dumps({"budgets": {"low": 1}}))
    with pytest.raises(ValueError, match="need positive low, medium and high"):
        EffortModel.load(tmp_path)
    (tmp_path / "effort.json").write_text("{")
    with pytest.raises(ValueError, match="not a valid effort file"):
        EffortModel.load(tmp_path)


def _run(engine, effort):
    h = engine.submit(EngineRequest(messages=PROMPT, effort=effort,
                                    params=SamplingParams(max_tokens=60, temperature=0.0)))
    engine.run_until_idle()
    return h


def test_auto_budget_comes_from_the_probe_after_prefill():
    d = make_engine().config.hidden_size
    # A probe that ignores the prompt predicts exp(bias) - 1 tokens: the budget is known exactly.
    probe = EffortProbe(np.zeros(d, np.float32), float(np.log1p(9.0)), margin=1.0, slack=0,
                        min_budget=1, max_budget=1000)
    # (This random model never opens <think>, so what the budget does to reasoning is tested on
    # the channel machine: test_channel.py::test_auto_budget_set_after_prefill_bounds_the_reasoning.
    # Here: the engine hands the probe the prompt's hidden state and the machine its budget.)
    engine = make_engine(effort=EffortModel({"low": 5, "medium": 40, "high": 50}, probe))
    h = _run(engine, "auto")
    assert h.reasoning_budget == 9
    assert engine.kv.pool.num_used == 0
    # Only auto asks prefill for the hidden state; the other efforts say their table's budget, and
    # without a probe auto runs at the medium budget.
    assert _run(engine, "high").reasoning_budget == 50
    assert _run(engine, "none").reasoning_budget is None
    plain = make_engine(effort=EffortModel({"low": 5, "medium": 7, "high": 50}))
    assert _run(plain, "auto").reasoning_budget == 7


def test_coverage_margin_budgets_above_the_need_of_most_turns():
    from train.effort_calibration import SLACK, coverage_margin

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    need = np.exp(3.5 + x @ np.array([0.4, -0.3, 0.2, 0, 0, 0]) + rng.normal(0, 0.3, 400))  # noisy need
    margin = coverage_margin(x[:300], need[:300], cover=0.9)
    assert 1.2 < margin < 3  # above the prediction by about the noise's 90th percentile (e^(0.3 x 1.28))
    probe = fit_probe(x[:300], need[:300], margin=margin, slack=SLACK, min_budget=1, max_budget=100_000)
    covered = np.mean([probe.budget(h) >= s for h, s in zip(x[300:], need[300:])])
    assert 0.8 <= covered <= 0.98  # on turns it never saw, about the share asked for
    assert coverage_margin(x[:5], need[:5]) == 1.5  # too few turns to measure: a fixed margin


def _two_kinds(n: int, seed: int):
    """Problems of two kinds: sums, right at every effort; conversions, right only at high.
    Low spends 20 reasoning tokens, medium 60, high 100."""
    rng = np.random.default_rng(seed)
    texts, kinds = [], []
    for i in range(n):
        a, b = rng.integers(1, 10_000, 2)
        if i % 2:
            texts.append(f"Convert {a} inches to metres, rounded to {b % 4} places.")
        else:
            texts.append(f"What is {a} + {b}? Show the sum.")
        kinds.append(i % 2)
    kinds = np.array(kinds, float)
    correct = {"low": 1 - kinds, "medium": 1 - kinds, "high": np.ones(n)}
    tokens = {"low": np.full(n, 20.0), "medium": np.full(n, 60.0), "high": np.full(n, 100.0)}
    return texts, correct, tokens


def test_router_picks_the_cheapest_effort_that_answers_as_well_as_high():
    texts, correct, tokens = _two_kinds(60, 0)
    router = fit_router(texts, correct, tokens, l2=0.1, tolerance=0.1)
    new_texts, _, _ = _two_kinds(10, 1)  # numbers it never saw: the kind decides
    assert [router.choose(t) for t in new_texts] == ["low", "high"] * 5
    pred = router.predict(new_texts[0])
    assert abs(pred["low"][1] - 20) < 1 and abs(pred["high"][1] - 100) < 1
    # The words a router sees: numbers folded into their digit counts.
    assert prompt_words("Convert 12.5 kg!") == ["convert", "<num3>", "kg", "!"]
    with pytest.raises(ValueError, match="needs 'high'"):
        fit_router(texts, {"low": correct["low"]}, {"low": tokens["low"]})
    with pytest.raises(ValueError, match="3 outcomes"):
        fit_router(texts, {"high": np.ones(3)}, {"high": np.ones(3)})


def test_last_user_text_reads_the_last_user_message():
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "image"},
                                                        {"type": "text", "text": "d"}]},
                           {"role": "tool", "content": "e"}]) == "c d"
    assert last_user_text([{"role": "system", "content": "s"}]) is None
    assert last_user_text(None) is None


def test_router_round_trips_and_a_bad_router_is_refused(tmp_path):
    texts, correct, tokens = _two_kinds(20, 0)
    model = EffortModel({"low": 32, "medium": 64, "high": 128}, router=fit_router(texts, correct, tokens))
    model.save(tmp_path)
    back = EffortModel.load(tmp_path)
    assert back.probe is None and back.router.efforts == ("low", "medium", "high")
    assert [back.route([{"role": "user", "content": t}]) for t in texts] == \
        [model.route([{"role": "user", "content": t}]) for t in texts]
    body = json.loads((tmp_path / "effort.json").read_text())
    body["router"]["efforts"] = ["low", "medium", "highest"]
    (tmp_path / "effort.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match="needs 'high'"):
        EffortModel.load(tmp_path)
    body["router"]["efforts"] = ["low", "high", "max"]
    (tmp_path / "effort.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=r"unknown efforts \['max'\]"):
        EffortModel.load(tmp_path)


def test_engine_serves_auto_at_the_routed_effort_with_its_hint_and_budget():
    texts, correct, tokens = _two_kinds(40, 0)
    budgets = {"low": 5, "medium": 7, "high": 50}
    engine = make_engine(effort=EffortModel(budgets, router=fit_router(texts, correct, tokens, l2=0.1,
                                                                        tolerance=0.1)))
    tok = tiny_tokenizer()
    params = SamplingParams(max_tokens=4, temperature=0.0)

    def run(text: str, **kw):
        h = engine.submit(EngineRequest(messages=[{"role": "user", "content": text}], effort="auto",
                                        params=params, **kw))
        engine.run_until_idle()
        return h, tok.decode(h.prompt_token_ids)

    sums, conversion = _two_kinds(2, 5)[0]
    h, prompt = run(sums)
    assert h.effort == "low" and "Reasoning effort: low." in prompt
    assert engine._live == {} and h.reasoning_budget == 5  # routed: low's budget, no probe after prefill
    h, prompt = run(conversion)
    assert h.effort == "high" and "Reasoning effort: high." in prompt
    # A follow-up with only a tool result routes on the stored conversation's last user message.
    follow = engine.submit(EngineRequest(messages=[{"role": "tool", "content": "0.0762"}], effort="auto",
                                         params=params, previous_response_id=h.request_id))
    engine.run_until_idle()
    assert follow.effort == "high"
    # A caller's own budget or a prompt of token ids is not routed.
    assert run(sums, reasoning_budget=9)[0].effort == "auto"
    raw = engine.submit(EngineRequest(prompt_token_ids=tok.encode("What is 1 + 2?"), effort="auto", params=params))
    engine.run_until_idle()
    assert raw.effort == "auto"
    assert engine.kv.pool.num_used == 0


def test_router_selection_saves_a_third_of_high_at_the_least_loss():
    from train.effort_calibration import SAVING, select_router

    texts, correct, tokens = _two_kinds(60, 0)
    best, tried = select_router(texts, correct, tokens)
    assert best in tried and len(tried) > 1
    # Sums go to low, conversions to high: 60 tokens a problem (high: 100) and nothing lost.
    assert best["reasoning_tokens"] <= (1 - SAVING) * 100 and best["accuracy"] == 1.0
    # When no setting can save a third (every effort costs the same): the cheapest within a point of high.
    flat = {e: np.full(60, 100.0) for e in tokens}
    best, _ = select_router(texts, correct, flat)
    assert best["accuracy"] == 1.0
