"""A curriculum: the synthetic mixture's level weights as a function of the training step.

The schedule is piecewise linear between milestones ``(step, (w1, w2, w3, w4, w5))``: before the
first milestone the first weights hold, after the last the last ones hold, and in between each
level's weight moves linearly. ``Curriculum.default(total_steps)`` starts on levels 1-2 and ends
with most of the mass on levels 3-5, so a small model first learns the format on easy problems.

    cur = Curriculum.default(10_000)
    cur.levels_at(0)       # {1: 0.7, 2: 0.3}
    cur.levels_at(10_000)  # {1: 0.05, 2: 0.1, 3: 0.25, 4: 0.3, 5: 0.3}

The curriculum is a frozen, hashable dataclass of tuples, so it can sit in a frozen run config.
"""

from __future__ import annotations

import dataclasses
import math

NUM_LEVELS = 5

# (fraction of the run, weights of levels 1..5) for Curriculum.default.
_DEFAULT = (
    (0.0, (0.7, 0.3, 0.0, 0.0, 0.0)),
    (0.2, (0.4, 0.4, 0.2, 0.0, 0.0)),
    (0.5, (0.15, 0.25, 0.3, 0.2, 0.1)),
    (1.0, (0.05, 0.1, 0.25, 0.3, 0.3)),
)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Level weights over training steps.

    Attributes:
      milestones: ``((step, (w1, ..., w5)), ...)`` with strictly increasing steps >= 0; each
        weight tuple has one non-negative weight per level 1..5 and a positive sum (weights need
        not sum to 1; they are normalised).
    """

    milestones: tuple[tuple[int, tuple[float, ...]], ...]

    def __post_init__(self):
        ms = tuple((int(s), tuple(float(w) for w in ws)) for s, ws in self.milestones)
        if not ms:
            raise ValueError("curriculum milestones must not be empty")
        for k, (step, weights) in enumerate(ms):
            if step < 0:
                raise ValueError(f"curriculum milestone {k}: step must be >= 0, got {step}")
            if k and step <= ms[k - 1][0]:
                raise ValueError(f"curriculum milestone steps must increase strictly, got "
                                 f"{ms[k - 1][0]} then {step}")
            if len(weights) != NUM_LEVELS:
                raise ValueError(f"curriculum milestone {k}: needs {NUM_LEVELS} weights (levels "
                                 f"1..{NUM_LEVELS}), got {len(weights)}")
            if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise ValueError(f"curriculum milestone {k}: weights must be finite, >= 0 and sum "
                                 f"to more than 0, got {weights}")
        object.__setattr__(self, "milestones", ms)

    @classmethod
    def constant(cls, weights: dict[int, float] | tuple[float, ...]) -> Curriculum:
        """The same level mix at every step (``{level: weight}`` or a 5-tuple)."""
        if isinstance(weights, dict):
            bad = [lv for lv in weights if lv not in range(1, NUM_LEVELS + 1)]
            if bad:
                raise ValueError(f"levels must be 1..{NUM_LEVELS}, got {bad}")
            weights = tuple(float(weights.get(lv, 0.0)) for lv in range(1, NUM_LEVELS + 1))
        return cls(((0, tuple(weights)),))

    @classmethod
    def default(cls, total_steps: int) -> Curriculum:
        """Easy (levels 1-2) at step 0, mostly levels 3-5 by ``total_steps``."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        points: dict[int, tuple[float, ...]] = {}
        for frac, weights in _DEFAULT:
            points[round(frac * total_steps)] = weights  # a short run merges close milestones
        return cls(tuple(sorted(points.items())))

    def weights_at(self, step: int) -> tuple[float, ...]:
        """The normalised weights of levels 1..5 at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        ms = self.milestones
        if step <= ms[0][0]:
            raw = ms[0][1]
        elif step >= ms[-1][0]:
            raw = ms[-1][1]
        else:
            k = next(i for i in range(1, len(ms)) if step < ms[i][0])
            (s0, w0), (s1, w1) = ms[k - 1], ms[k]
            a = (step - s0) / (s1 - s0)
            raw = tuple((1 - a) * x + a * y for x, y in zip(w0, w1))
        total = sum(raw)
        return tuple(w / total for w in raw)

    def levels_at(self, step: int) -> dict[int, float]:
        """``{level: weight}`` at ``step``, levels of weight 0 left out (``mixture``'s format)."""
        return {lv: w for lv, w in enumerate(self.weights_at(step), start=1) if w > 0}

    def mean_level(self, step: int) -> float:
        """The expected level at ``step``: rises over a run for an easy-to-hard schedule."""
        return sum(lv * w for lv, w in enumerate(self.weights_at(step), start=1))
