"""bench/tower_alone.py: its pictures are one digit each, fixed by the seed, and a short run of the
tower alone trains and logs an accuracy."""

import io
import random

import pytest
from PIL import Image

from bench.tower_alone import digit_picture, measure


def test_each_picture_is_one_digit_drawn_by_the_seed():
    png, digit = digit_picture(random.Random(3))
    assert (png, digit) == digit_picture(random.Random(3)) and 0 <= digit <= 9
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (224, 224) and len(image.getcolors(1 << 16)) > 2  # ink on a background
    assert len({digit_picture(random.Random(s))[1] for s in range(40)}) == 10


@pytest.mark.parametrize("pool", [pytest.param("attention", marks=pytest.mark.slow), "max"])  # 9 s cold
def test_a_short_run_trains_and_logs(pool):
    result = measure(pool, steps=10, patch=28, layers=1, lr=1e-3, batch=2, seed=0)
    assert result["pool"] == pool and [r["step"] for r in result["log"]] == [10]
    assert 0 <= result["accuracy_last_10_logs"] <= 1 and result["loss_last_10_logs"] > 0
