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

A model trained to heed the effort hint (``Reasoning effort: X.`` in its system turn) sizes its own
reasoning, and a budget can then only cut it short. For such a model ``auto`` is a router instead
(``"router"`` in the file): before the prompt is rendered, a small linear model on the request's
last user message (hashed word and word-pair features, digits folded into their count) predicts,
for each effort, whether the answer will be right and how many reasoning tokens it will take, and
picks the cheapest effort predicted to answer as well as ``high`` (within ``tolerance``). The
prompt is then rendered with that effort's hint and reasons under that effort's budget; ``auto``
among the choices is the model's own sizing under the medium budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
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
    w = ridge((x - mu) / sd, y, l2)
    weights = w[:-1] / sd
    return EffortProbe(weights.astype(np.float32), float(w[-1] - mu @ weights), **kw)


def ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Ridge regression weights of `y` on `x` [N, D] with an unpenalised bias as the last entry,
    closed form in float64: the D x D system, or its N x N dual when there are fewer rows than
    features (a router's hashed words)."""
    mu, ym = x.mean(0), y.mean()
    xc = x - mu
    if len(x) < x.shape[1]:
        w = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(len(x)), y - ym)
    else:
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - ym))
    return np.append(w, ym - mu @ w)


ROUTER_BUCKETS = 2048
# A JSON list of numbers as json.dumps(indent=...) writes it, one per line; saved on one line.
_NUMBER_LIST = re.compile(r"\[(?:\s*-?\d[\d.eE+-]*,)*\s*-?\d[\d.eE+-]*\s*\]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[^\W\d]+|<num\d+>|[^\w\s]")


def prompt_words(text: str) -> list[str]:
    """Lowercased words and punctuation; a number becomes ``<numK>`` (K its digit count), so the
    features see a problem's kind and its size, not its values."""
    text = _NUMBER.sub(lambda m: f" <num{sum(c.isdigit() for c in m.group())}> ", text.lower())
    return _WORD.findall(text)


def prompt_features(text: str, buckets: int = ROUTER_BUCKETS) -> np.ndarray:
    """Words and adjacent word pairs hashed (CRC-32, stable across runs) into `buckets` binary
    features, scaled to unit length."""
    words = prompt_words(text)
    v = np.zeros(buckets, np.float64)
    for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
        v[zlib.crc32(gram.encode()) % buckets] = 1.0
    norm = np.linalg.norm(v)
    return v / norm if norm else v


def last_user_text(messages) -> str | None:
    """The text of the last user message (text parts of a content list joined), or None."""
    for m in reversed(list(messages or ())):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        return None
    return None


@dataclasses.dataclass(frozen=True)
class EffortRouter:
    """``effort=auto`` for a model that heeds the effort hint: the cheapest effort predicted to
    answer as well as high.

    ``correct[e]`` and ``tokens[e]`` are ridge weights (bias last) on ``prompt_features`` of the
    last user message, predicting whether effort ``efforts[e]`` answers right and the reasoning
    tokens it spends.
    """

    efforts: tuple[str, ...]
    correct: np.ndarray  # [E, buckets + 1]
    tokens: np.ndarray   # [E, buckets + 1]
    tolerance: float = 0.0

    def __post_init__(self):
        if "high" not in self.efforts:
            raise ValueError(f"a router needs 'high' among its efforts, got {self.efforts}")
        shape = (len(self.efforts), self.correct.shape[-1])
        if self.correct.shape != shape or self.tokens.shape != shape or shape[1] < 2:
            raise ValueError(f"router weights must be [{len(self.efforts)}, buckets + 1], got "
                             f"{self.correct.shape} and {self.tokens.shape}")

    @property
    def buckets(self) -> int:
        return self.correct.shape[1] - 1

    def predict(self, text: str) -> dict[str, tuple[float, float]]:
        """``{effort: (predicted chance of a right answer, predicted reasoning tokens)}``."""
        x = np.append(prompt_features(text, self.buckets), 1.0)
        return {e: (float(self.correct[i] @ x), float(self.tokens[i] @ x)) for i, e in enumerate(self.efforts)}

    def choose(self, text: str) -> str:
        pred = self.predict(text)
        good_enough = [e for e in self.efforts if pred[e][0] >= pred["high"][0] - self.tolerance]
        return min(good_enough, key=lambda e: pred[e][1])

    def to_json(self) -> dict:
        return {"efforts": list(self.efforts), "tolerance": self.tolerance,
                "correct": [[round(float(x), 6) for x in row] for row in self.correct],
                "tokens": [[round(float(x), 4) for x in row] for row in self.tokens]}

    @classmethod
    def from_json(cls, d: Mapping) -> EffortRouter:
        return cls(tuple(d["efforts"]), np.asarray(d["correct"], np.float64),
                   np.asarray(d["tokens"], np.float64), float(d.get("tolerance", 0.0)))


def fit_router(texts: list[str], correct: Mapping[str, np.ndarray], tokens: Mapping[str, np.ndarray], *,
               l2: float = 1.0, tolerance: float = 0.0, buckets: int = ROUTER_BUCKETS) -> EffortRouter:
    """Fits an ``EffortRouter`` on problems played at each effort: per effort, whether each was
    answered right (0/1) and the reasoning tokens it took, aligned with `texts`."""
    if len(texts) < 2:
        raise ValueError(f"a router needs at least 2 problems, got {len(texts)}")
    efforts = tuple(correct)
    if set(tokens) != set(efforts):
        raise ValueError(f"outcomes for efforts {sorted(efforts)} but token counts for {sorted(tokens)}")
    for e in efforts:
        if len(correct[e]) != len(texts) or len(tokens[e]) != len(texts):
            raise ValueError(f"effort {e!r}: {len(correct[e])} outcomes and {len(tokens[e])} token "
                             f"counts for {len(texts)} problems")
    x = np.stack([prompt_features(t, buckets) for t in texts])
    return EffortRouter(efforts,
                        np.stack([ridge(x, np.asarray(correct[e], np.float64), l2) for e in efforts]),
                        np.stack([ridge(x, np.asarray(tokens[e], np.float64), l2) for e in efforts]),
                        tolerance)


@dataclasses.dataclass(frozen=True)
class EffortModel:
    """A served model's effort table and, when calibrated, its ``auto`` probe or router."""

    budgets: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(EFFORT_BUDGETS))
    probe: EffortProbe | None = None
    router: EffortRouter | None = None

    def route(self, messages) -> str | None:
        """The effort an ``auto`` request over `messages` is served at, when a router decides it
        (from the last user message); None: no router, or no user text to route on."""
        text = last_user_text(messages) if self.router is not None else None
        return self.router.choose(text) if text is not None else None

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
            router = EffortRouter.from_json(d["router"]) if d.get("router") else None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid effort file: {e}") from None
        missing = {"low", "medium", "high"} - set(budgets)
        if missing or any(v < 1 for v in budgets.values()):
            raise ValueError(f"{path}: budgets need positive low, medium and high entries, got {budgets}")
        unknown = set(router.efforts) - {"low", "medium", "high", "auto"} if router else set()
        if unknown:
            raise ValueError(f"{path}: the router chooses unknown efforts {sorted(unknown)}")
        return cls(budgets, probe, router)

    def save(self, checkpoint: str | os.PathLike, calibration: Mapping | None = None) -> Path:
        """Writes ``effort.json`` atomically (a temporary file renamed over the old one)."""
        path = Path(checkpoint) / EFFORT_FILE
        body = {"budgets": dict(self.budgets), "probe": self.probe.to_json() if self.probe else None,
                "router": self.router.to_json() if self.router else None,
                "calibration": dict(calibration or {})}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(_NUMBER_LIST.sub(lambda m: re.sub(r"\s+", "", m.group()), json.dumps(body, indent=1)) + "\n")
        os.replace(tmp, path)
        return path
