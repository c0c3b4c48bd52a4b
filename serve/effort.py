"""Reasoning effort for one served model: its calibrated budget table and the ``auto`` predictor.

Both live in the checkpoint's ``effort.json`` (written by ``train/effort_calibration.py``):

    {"budgets": {"low": 48, "medium": 96, "high": 192},
     "probe": {"weights": [...D floats...], "bias": 4.1, "margin": 1.25, "slack": 8,
               "min_budget": 32, "max_budget": 192},
     "calibration": {...how it was measured...}}

``auto`` is a linear probe on the prompt's last hidden state (the final norm's output at the last
prompt token, which the engine's prefill computes anyway): it predicts ``log(1 + reasoning
tokens)`` that the model spends on that turn at high effort, and the budget is that prediction
times ``margin`` plus ``slack``, clipped to ``[min_budget, max_budget]``. A turn cut short usually
loses its answer, so calibration sets ``margin`` to cover the need of 95% of turns, measured out
of fold (``train.effort_calibration.coverage_margin``). A tool round is a new
engine request, so every round gets its own prediction from its own prompt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from serve.channel import EFFORT_BUDGETS

EFFORT_FILE = "effort.json"


@dataclasses.dataclass(frozen=True)
class EffortProbe:
    """``budget = clip(exp(w . h + b) * margin + slack, min_budget, max_budget)``."""

    weights: np.ndarray  # [D] float32
    bias: float
    margin: float = 1.25
    slack: int = 8
    min_budget: int = 32
    max_budget: int = 16384

    def predict_tokens(self, hidden: np.ndarray) -> float:
        """The reasoning tokens the model is predicted to spend after this prompt."""
        h = np.asarray(hidden, np.float32).reshape(-1)
        if h.shape != self.weights.shape:
            raise ValueError(f"hidden state has {h.size} values; the probe expects {self.weights.size}")
        return float(math.expm1(float(h @ self.weights) + self.bias))

    def budget(self, hidden: np.ndarray) -> int:
        raw = max(self.predict_tokens(hidden), 0.0) * self.margin + self.slack
        return int(min(max(round(raw), self.min_budget), self.max_budget))

    def to_json(self) -> dict:
        return {"weights": [float(x) for x in self.weights], "bias": self.bias, "margin": self.margin,
                "slack": self.slack, "min_budget": self.min_budget, "max_budget": self.max_budget}

    @classmethod
    def from_json(cls, d: Mapping) -> EffortProbe:
        return cls(np.asarray(d["weights"], np.float32), float(d["bias"]), float(d.get("margin", 1.25)),
                   int(d.get("slack", 8)), int(d.get("min_budget", 32)), int(d.get("max_budget", 16384)))


def fit_probe(hidden: np.ndarray, tokens: np.ndarray, *, l2: float = 1.0, **kw) -> EffortProbe:
    """Ridge regression of ``log(1 + tokens)`` on `hidden` [N, D] (features standardised inside,
    folded back into plain weights), closed form in float64."""
    x = np.asarray(hidden, np.float64)
    y = np.log1p(np.asarray(tokens, np.float64))
    if x.ndim != 2 or len(x) != len(y) or len(y) < 2:
        raise ValueError(f"need [N, D] hidden states and N token counts (N >= 2), got {x.shape}, {y.shape}")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    ym = y.mean()
    w = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ (y - ym))
    weights = w / sd
    return EffortProbe(weights.astype(np.float32), float(ym - mu @ weights), **kw)


@dataclasses.dataclass(frozen=True)
class EffortModel:
    """A served model's effort table and, when calibrated, its ``auto`` probe."""

    budgets: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(EFFORT_BUDGETS))
    probe: EffortProbe | None = None

    @classmethod
    def load(cls, checkpoint: str | os.PathLike) -> EffortModel:
        """The checkpoint's ``effort.json``, or the default table (no probe) when it has none.

        Raises:
          ValueError: the file exists but is malformed.
        """
        path = Path(checkpoint) / EFFORT_FILE
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text())
            budgets = {k: int(v) for k, v in d["budgets"].items()}
            probe = EffortProbe.from_json(d["probe"]) if d.get("probe") else None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid effort file: {e}") from None
        missing = {"low", "medium", "high"} - set(budgets)
        if missing or any(v < 1 for v in budgets.values()):
            raise ValueError(f"{path}: budgets need positive low, medium and high entries, got {budgets}")
        return cls(budgets, probe)

    def save(self, checkpoint: str | os.PathLike, calibration: Mapping | None = None) -> Path:
        """Writes ``effort.json`` atomically (a temporary file renamed over the old one)."""
        path = Path(checkpoint) / EFFORT_FILE
        body = {"budgets": dict(self.budgets), "probe": self.probe.to_json() if self.probe else None,
                "calibration": dict(calibration or {})}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, path)
        return path
