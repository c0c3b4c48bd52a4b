"""The curriculum: level weights follow the schedule, easy first and hard later, in the data too."""

from collections import Counter

import pytest

from train.curriculum import Curriculum
from train.data import BatchBuilder, SyntheticDataConfig


def test_piecewise_linear_schedule():
    cur = Curriculum(((10, (1, 0, 0, 0, 0)), (20, (0, 0, 0, 0, 1))))
    assert cur.levels_at(0) == {1: 1.0} and cur.levels_at(10) == {1: 1.0}
    assert cur.levels_at(15) == pytest.approx({1: 0.5, 5: 0.5})
    assert cur.levels_at(20) == {5: 1.0} and cur.levels_at(10**6) == {5: 1.0}
    assert cur.weights_at(12) == pytest.approx((0.8, 0, 0, 0, 0.2))


def test_default_moves_from_easy_to_hard():
    cur = Curriculum.default(1000)
    means = [cur.mean_level(s) for s in range(0, 1001, 50)]
    assert all(a <= b + 1e-12 for a, b in zip(means, means[1:])) and means[0] < 1.5 < 3.5 < means[-1]
    assert set(cur.levels_at(0)) == {1, 2}
    assert cur.weights_at(1000)[4] > cur.weights_at(1000)[0]
    for s in (0, 137, 999):
        assert sum(cur.weights_at(s)) == pytest.approx(1.0)
    assert Curriculum.default(3).levels_at(3) == cur.levels_at(1000)  # short runs keep the shape


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="increase"):
        Curriculum(((5, (1,) * 5), (5, (1,) * 5)))
    with pytest.raises(ValueError, match="5 weights"):
        Curriculum(((0, (1, 1)),))
    with pytest.raises(ValueError, match="sum"):
        Curriculum(((0, (0,) * 5),))
    with pytest.raises(ValueError, match="levels must be"):
        Curriculum.constant({6: 1.0})
    with pytest.raises(ValueError, match="step"):
        Curriculum.default(10).weights_at(-1)


def test_examples_of_a_batch_follow_the_schedule():
    # The example stream only (no tokenizer needed): levels drawn at each step match the mix.
    cur = Curriculum(((0, (1, 0, 0, 0, 0)), (100, (0, 0, 1, 1, 0)), (200, (0, 0, 0, 0, 1))))
    b = BatchBuilder(SyntheticDataConfig(tokenizer="unused", curriculum=cur, seed=4))

    def levels(step, n=200):
        stream = b.examples(step)
        return Counter(next(stream).meta["level"] for _ in range(n))

    assert levels(0) == Counter({1: 200})
    mid = levels(100)
    assert set(mid) == {3, 4} and 70 < mid[3] < 130
    assert levels(250) == Counter({5: 200})
    # Deterministic: the same step draws the same examples; another step others.
    first = [next(b.examples(50)).messages for _ in range(2)]
    assert first[0] == first[1] and next(b.examples(51)).messages != first[0]
