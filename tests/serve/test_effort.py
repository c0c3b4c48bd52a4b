"""Reasoning effort: the probe fits what it should, the file round-trips, and the engine's
``effort="auto"`` takes its budget from the prompt's last hidden state after prefill."""

import json

import numpy as np
import pytest

from serve import events as ev
from serve.effort import EffortModel, EffortProbe, fit_probe
from serve.engine import EngineRequest
from serve.request import SamplingParams
from test_engine import make_engine

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
    # Only auto asks prefill for the hidden state; without a probe auto runs at the medium budget.
    assert _run(engine, "high").reasoning_budget is None
    plain = make_engine(effort=EffortModel({"low": 5, "medium": 7, "high": 50}))
    assert _run(plain, "auto").reasoning_budget is None


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
