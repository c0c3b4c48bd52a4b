"""Problems rendered as images: deterministic, small, answers tied to what was drawn, text kept inside."""

import io
import math
import random
import re
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from train.data import stream_seed
from train.eval import heldout_examples
from train.synthetic import IMAGE_PLACEHOLDER, SUITES, check_answer, generate, mixture, task_weights
from train.synthetic.drawing import MAX_SIDE, MIN_SIDE, contrast
from train.synthetic.images import gallery
from train.synthetic.quantities import parse_number

VISION = SUITES["vision"]
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def expected_value(fig: dict) -> Fraction:
    """The answer recomputed from the generator's record of the picture (not from its steps)."""
    F = lambda s: Fraction(s)  # noqa: E731
    q = fig["question"]
    if fig["kind"] == "chart":
        v = [F(x) for x in fig["values"]]
        used = [v[k] for k in fig["bars_used"]]
        return {"largest": lambda: max(v), "smallest": lambda: min(v), "sum": lambda: sum(used),
                "difference": lambda: used[0] - used[1], "ratio": lambda: used[0] / used[1]}[q]()
    if fig["kind"] == "table" and fig["topic"] == "prices":
        cost = [F(p) * F(n) for p, n in zip(fig["prices"], fig["quantities"])]
        x = fig["rows_used"]
        return {"row": lambda: cost[x[0]], "difference": lambda: F(fig["prices"][x[0]]) - F(fig["prices"][x[1]]),
                "two_rows": lambda: cost[x[0]] + cost[x[1]], "all": lambda: sum(cost)}[q]()
    if fig["kind"] == "table":
        rain, m, x = [[F(r) for r in row] for row in fig["rain"]], fig["month"], fig["rows_used"]
        return {"town_total": lambda: sum(rain[x[0]]), "month_difference": lambda: rain[x[0]][m] - rain[x[1]][m],
                "mean": lambda: sum(r[m] for r in rain) / len(rain)}[q]()
    s = {k: float(v) for k, v in fig["sides"].items()}
    value = {"hypotenuse": lambda: math.hypot(s.get("a", 0), s.get("b", 0)),
             "leg": lambda: math.sqrt(s["c"] ** 2 - s["a"] ** 2),
             "area": lambda: s["a"] * s["b"] / 2,
             "angle": lambda: math.degrees(math.asin(s["a"] / s["c"]) if "c" in s and "a" in s
                                           else math.acos(s["b"] / s["c"]) if "c" in s
                                           else math.atan(s["a"] / s["b"]))}[q]()
    return Fraction(value)


@pytest.mark.parametrize("task", VISION + SUITES["reading"])
def test_same_seed_same_example_and_picture(task):
    a, b = generate(task, level=3, seed=11), generate(task, level=3, seed=11)
    assert a == b and a.images == b.images and len(a.images) == 1
    others = {generate(task, level=3, seed=s).images[0] for s in range(12, 16)}
    assert a.images[0] not in others and len(others) == 4


@pytest.mark.parametrize("task", VISION)
def test_every_kind_renders_a_small_picture_whose_answer_matches_what_was_drawn(task):
    for level in (1, 2, 3, 4, 5):
        for seed in range(5):
            for tools in (True, False):
                ex = generate(task, level=level, seed=seed, split=("train", "heldout")[seed % 2], tools=tools)
                fig, user = ex.meta["figure"], ex.messages[1]["content"]
                assert user.count(IMAGE_PLACEHOLDER) == len(ex.images) == 1
                image = decode(ex.images[0])
                assert image.size == tuple(fig["size"]) and all(MIN_SIDE <= side <= MAX_SIDE for side in image.size)
                final = ex.messages[-1]["content"]
                assert check_answer(ex, final), (task, level, seed, final)
                first_reasoning = ex.messages[2]["reasoning_content"].splitlines()[0]
                drawn_numbers = {n for text in fig["texts"] for n in _NUMBER.findall(text)}
                if fig["kind"] == "text":
                    # The reasoning transcribes exactly the text that was drawn.
                    assert fig["texts"] == [fig["text"]] and first_reasoning == f"The image reads: {fig['text']}"
                    continue
                # Every value the reasoning reads off the picture was drawn on it.
                assert set(_NUMBER.findall(first_reasoning)) <= drawn_numbers, (first_reasoning, fig["texts"])
                want, got = expected_value(fig), parse_number(ex.meta["value"])
                assert abs(got - want) <= Fraction(1, 10**6) * max(1, abs(want)), (task, fig, ex.meta["answer"])


def test_the_reading_drill_asks_back_exactly_the_drawn_text():
    words = {"train": set(), "heldout": set()}
    for level in (1, 2, 3, 4, 5):
        for seed in range(10 * level, 10 * level + 10):
            split = ("train", "heldout")[seed % 2]
            ex = generate("image_read", level=level, seed=seed, split=split)
            fig, m = ex.meta["figure"], ex.meta
            assert fig["texts"] == [fig["text"]] == [m["answer"]] and not ex.tools
            assert ex.messages[1]["content"].startswith(f"{IMAGE_PLACEHOLDER}\n") and len(ex.images) == 1
            assert ex.messages[2]["reasoning_content"] == f"The image reads: {m['answer']}"
            assert check_answer(ex, ex.messages[-1]["content"]) and not check_answer(ex, "Answer: 1, 2")
            image = decode(ex.images[0])
            assert image.size == tuple(fig["size"]) and all(MIN_SIDE <= side <= MAX_SIDE for side in image.size)
            x0, y0, x1, y1 = fig["boxes"][0]
            assert 0 <= x0 < x1 <= image.size[0] and 0 <= y0 < y1 <= image.size[1]
            if ":" in m["answer"]:
                words[split].add(m["answer"].split(":")[0].lower())
            else:  # a few numbers of the level's sizes, at most 1 + level // 2 of them
                assert 1 <= len(m["answer"].split(", ")) <= 1 + level // 2
    assert words["train"] and words["heldout"] and not words["train"] & words["heldout"]


def test_wrong_answers_are_rejected():
    for task in VISION:
        ex = generate(task, level=2, seed=3)
        assert check_answer(ex, ex.messages[-1]["content"])
        assert not check_answer(ex, "Answer: 123456789.5")


def test_rotated_text_stays_inside_the_picture():
    rotations = []
    for seed in range(40):
        ex = generate("image_text", level=5, seed=seed)
        fig = ex.meta["figure"]
        rotations.append(abs(fig["style"]["rotation"]))
        image = np.asarray(decode(ex.images[0])).astype(int)
        ink = np.abs(image - np.array(fig["background"])).sum(-1) > 0
        x0, y0, x1, y1 = fig["boxes"][0]
        assert 0 < x0 and 0 < y0 and x1 < image.shape[1] and y1 < image.shape[0]
        outside = ink.copy()
        outside[y0:y1, x0:x1] = False
        assert ink.sum() > 200 and not outside.any(), f"seed {seed}: ink outside the text box"
        assert not ink[:3].any() and not ink[-3:].any() and not ink[:, :3].any() and not ink[:, -3:].any()
    assert max(rotations) > 3 and max(rotations) <= 6, "level 5 turns text by up to 6 degrees"


def test_every_drawn_character_has_its_ink_centre_recorded():
    """``figure["glyphs"]``: each inked character of every string, in drawing order, on its ink."""
    turned = 0
    for task in VISION + SUITES["reading"]:
        for seed in range(8):
            ex = generate(task, level=1 + seed % 5, seed=seed)
            fig = ex.meta["figure"]
            turned += abs(fig["style"].get("rotation", 0)) > 2 or fig["style"].get("italic", False)
            assert "".join(ch for ch, _, _ in fig["glyphs"]) == "".join("".join(fig["texts"]).split())
            image = np.asarray(decode(ex.images[0])).astype(int)
            ink = np.abs(image - np.array(fig["background"])).sum(-1) > 60
            # The ink centre of a round letter lies in its hole, about a quarter of the size from ink.
            r = max(3, fig["style"].get("size", 0) // 4)
            for ch, x, y in fig["glyphs"]:
                assert 0 <= x < fig["size"][0] and 0 <= y < fig["size"][1]
                near = ink[max(0, int(y) - r):int(y) + r + 1, max(0, int(x) - r):int(x) + r + 1]
                assert near.any(), f"{task} seed {seed}: no ink within {r} px of {ch!r} at ({x}, {y})"
    assert turned >= 3, "slanted and rotated text is among the cases"


def test_characters_stay_legible_at_the_towers_224_px():
    """After the squash to 224 x 224 a character keeps at least 6.5 px of pitch (median of a picture's
    neighbouring glyphs on one line); drawn on 448 px canvases at 11 px, charts kept 4.5."""
    for task in VISION + SUITES["reading"]:
        for seed in range(10):
            fig = generate(task, level=1 + seed % 5, seed=seed, split=("train", "heldout")[seed % 2]).meta["figure"]
            g, (w, h) = fig["glyphs"], fig["size"]
            pitch = [(b[1] - a[1]) * 224 / w for a, b in zip(g, g[1:]) if abs(b[2] - a[2]) < 3 and 0 < b[1] - a[1] < 40]
            assert len(g) < 2 or np.median(pitch) >= 6.5, (task, seed, np.median(pitch))  # one digit: no pitch
            assert max(w, h) <= MAX_SIDE


def test_every_label_is_inside_and_colours_are_readable():
    for task in VISION:
        for seed in range(10):
            ex = generate(task, level=1 + seed % 5, seed=seed)
            fig = ex.meta["figure"]
            w, h = fig["size"]
            for x0, y0, x1, y1 in fig["boxes"]:
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (task, seed, fig["texts"])
            image = decode(ex.images[0])
            # The most common colour is the background; some ink contrasts strongly with it.
            colours = sorted(image.getcolors(1 << 20), reverse=True)
            assert colours[0][1] == tuple(fig["background"])
            assert max(contrast(c, tuple(fig["background"])) for _, c in colours) >= 7


def test_heldout_problems_share_neither_seeds_nor_names_with_training():
    # Seeds: the eval's per-problem seeds never equal a training stream's per-example seeds.
    eval_seeds = {stream_seed(s, i, tag="eval") for s in range(3) for i in range(200)}
    train_seeds = {stream_seed(s, step) * 1_000_003 + j for s in range(3) for step in range(200) for j in range(64)}
    assert not eval_seeds & train_seeds

    def names(examples):
        out = set()
        for ex in examples:
            fig = ex.meta["figure"]
            out |= set(fig.get("labels", []) + fig.get("items", []) + fig.get("towns", []))
            if fig["kind"] == "triangle":
                out.add(fig["unit"])
        return out

    levels = {lv: 1.0 for lv in (1, 2, 3, 4, 5)}
    train = list(mixture(0, levels, "train", n=120, tasks={"vision": 1.0}))
    held = [ex for pair in heldout_examples("vision", 60, seed=0) for ex in pair]
    assert {ex.meta["split"] for ex in held} == {"heldout"} and {ex.meta["task"] for ex in held} == set(VISION)
    assert names(train) and names(held) and not names(train) & names(held)
    assert not {ex.images[0] for ex in train} & {ex.images[0] for ex in held}


def test_suite_names_expand_to_their_tasks_and_defaults_exclude_pictures():
    assert task_weights({"vision": 1.0}) == {t: 0.25 for t in VISION}
    assert task_weights({"vision": 2.0, "image_table": 1.0})["image_table"] == 1.5
    assert not set(task_weights(None)) & (set(VISION) | set(SUITES["reading"]))
    with pytest.raises(ValueError, match="unknown task"):
        task_weights({"pictures": 1.0})
    assert all(not generate(level=2, rng=random.Random(s)).images for s in range(30))


def test_gallery_writes_pictures_and_their_questions(tmp_path):
    paths = gallery(tmp_path, n=5, seed=2)
    assert [p.suffix for p in paths] == [".png"] * 5 and all(decode(p.read_bytes()) for p in paths)
    index = (tmp_path / "index.md").read_text()
    assert index.count("Question:") == 5 and index.count("Answer:") == 5 and "[image]" in index


def test_fonts_shipped_inside_packages_are_found_and_used(tmp_path, monkeypatch):
    import pathlib
    import shutil

    from train.synthetic import drawing

    source = pathlib.Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf")
    if not source.exists():
        pytest.skip("no TrueType file on this machine to stand in for a package's font")
    package = tmp_path / "site-packages" / "somepkg" / "fonts"
    package.mkdir(parents=True)
    shutil.copy(source, package / "DejaVuSerif.ttf")
    (package / "not-a-font.ttf").write_bytes(b"junk")
    (package / "STIXSizeOneSym.ttf").write_bytes(source.read_bytes())  # a symbol face by its name
    plain = [generate("image_text", level=2, seed=s) for s in range(20)]
    monkeypatch.setattr(drawing, "site_package_dirs", lambda: [str(tmp_path / "site-packages")])
    drawing.package_fonts.cache_clear()
    try:
        assert drawing.font_names() == ("builtin", str(package / "DejaVuSerif.ttf"))
        more = [generate("image_text", level=2, seed=s) for s in range(20)]
        fonts = [ex.meta["figure"]["style"]["font"] for ex in more]
        assert set(fonts) == {"builtin", "DejaVuSerif.ttf"}
        # Which fonts a machine has changes pixels only, never the problem or its answer.
        assert [ex.messages for ex in more] == [ex.messages for ex in plain]
        assert all((a.images == b.images) == (f == "builtin") for a, b, f in zip(plain, more, fonts))
    finally:
        drawing.package_fonts.cache_clear()
