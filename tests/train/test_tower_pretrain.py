"""train/tower_pretrain.py: per-cell character targets from the figures' glyph records, a short
pretraining of the tiny tower, and a merged checkpoint that ``kestrel train`` starts from."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs.nano_tiny import config as nano_tiny_config
from configs.nano_vision_tiny import config as tiny_vision_config
from kestrel.errors import KestrelError
from model.checkpoint import flatten_params, load_checkpoint, read_config, restore_params, save_checkpoint
from model.transformer import Transformer
from train import tower_pretrain as tp
from train.loop import run
from train.nano_tokenizer import train_nano_tokenizer

CONFIG = "configs/nano_vision_tiny.py"


def test_cell_targets_read_each_cell_in_drawing_order_and_count_what_does_not_fit():
    # A 200 x 100 picture on a 2 x 2 grid: cells are 100 x 50 px.
    glyphs = [("4", 10, 10), ("7", 60, 12), ("x", 150, 20), ("é", 20, 80), ("1", 30, 80), ("2", 40, 80)]
    targets, lost = tp.cell_targets(glyphs, (200, 100), side=2, slots=2)
    c = tp.char_class
    np.testing.assert_array_equal(targets, [[c("4"), c("7")], [c("x"), tp.STOP], [tp.OTHER, c("1")],
                                            [tp.STOP, tp.STOP]])
    assert lost == 1  # "2" found its cell full
    assert c("é") == tp.OTHER and c("~") == tp.NUM_CLASSES - 1
    mask = tp.scored_slots(targets)
    np.testing.assert_array_equal(mask, [[True, True], [True, True], [True, True], [True, False]])


def test_picture_batches_carry_every_task_and_only_targets_of_drawn_characters():
    vision = tiny_vision_config().model.vision
    import random
    batch = tp.picture_batch(random.Random(0), 6, "heldout", vision, slots=4)
    assert batch["pixels"].shape == (6, vision.image_size, vision.image_size, 3)
    assert batch["targets"].shape == (6, vision.mm_tokens_per_image, 4)
    assert (batch["targets"] != tp.STOP).sum() > 20  # the pictures' characters, cell by cell
    assert batch["mask"].sum() >= (batch["targets"] != tp.STOP).sum()


def test_scores_count_characters_and_whole_cells():
    targets = np.array([[[5, 6, 0], [0, 0, 0]]])
    logits = np.zeros((1, 2, 3, tp.NUM_CLASSES))
    logits[0, 0, 0, 5] = logits[0, 0, 1, 7] = logits[0, 0, 2, 0] = logits[0, 1, :, 0] = 1
    got = tp.scores(logits, targets, tp.scored_slots(targets))
    assert got == {"char_accuracy": 0.5, "cell_exact": 0.0, "chars": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A text-only tiny model as the base, and the tokenizer the tiny vision config trains with."""
    root = tmp_path_factory.mktemp("tower_base")
    tok = train_nano_tokenizer(root / "tok", vocab_size=1800, n_examples=80, seed=3)
    cfg = nano_tiny_config().model.replace(dtype="float32", param_dtype="float32")
    save_checkpoint(Transformer(cfg, rngs=nnx.Rngs(7)), root / "base", tokenizer=tok)
    return root


@pytest.fixture(scope="module")
def pretrained(base):
    out = base / "tower"
    assert tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(out), "--steps", "3",
                    "--batch", "2", "--eval-pictures", "3", "--slots", "3"]) == 0
    return out


def test_pretraining_writes_the_base_with_the_tower_and_kestrel_train_starts_from_it(base, pretrained):
    out = pretrained
    assert read_config(out).vision == tiny_vision_config().model.vision
    record = json.loads((out / "tower_pretraining.json").read_text())
    assert record["steps"] == 3 and 0 <= record["heldout"]["char_accuracy"] <= 1
    merged, have = flatten_params(restore_params(out)), flatten_params(restore_params(base / "base"))
    for key, value in have.items():  # the text model is the base's, untouched
        np.testing.assert_array_equal(np.asarray(merged[key]), np.asarray(value))
    assert any(k.startswith("vision/") for k in merged)
    model, tok = load_checkpoint(out)
    assert tok is not None and model.vision is not None

    overrides = [f"data.tokenizer={base / 'tok'}", "steps=1", f"init_from={out}"]
    result = run(CONFIG, base / "run", overrides, devices=jax.devices()[:1], report=lambda _: None)
    assert result.last_step == 1 and all(np.isfinite(v) for v in result.losses.values())


def test_bad_input_is_named_before_anything_trains(base, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tp.main(["--config", "configs/nano_tiny.py", "--base", str(base / "base"), "--out", str(tmp_path / "x")])
    assert "has no vision tower" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.main(["--config", CONFIG, "--base", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "is not a Kestrel checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(base / "base")])
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(tmp_path / "x"),
                 "--set", "model.vision.patch_sise=4"])
    assert "did you mean model.vision.patch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(tmp_path / "x"),
                 "--start-from", str(tmp_path)])
    assert "is not a Kestrel checkpoint" in capsys.readouterr().err


def test_training_goes_on_from_an_earlier_output_with_its_tower_and_head(base, pretrained, tmp_path, capsys):
    vision = tiny_vision_config().model.vision
    reader = tp.build_reader(vision, 32, 3, seed=99)
    tp.load_reader(reader, pretrained)
    stored = flatten_params(restore_params(pretrained))
    for key, value in flatten_params(nnx.to_pure_dict(nnx.state(reader.tower, nnx.Param))).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(stored[f"vision/{key}"]))
    head = np.load(pretrained / tp.HEAD_FILE)
    np.testing.assert_array_equal(np.asarray(reader.head.kernel[...]), head["kernel"])

    out = tmp_path / "more"
    assert tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(out), "--steps", "2",
                    "--batch", "2", "--eval-pictures", "2", "--slots", "3", "--start-from", str(pretrained)]) == 0
    record = json.loads((out / tp.RECORD_FILE).read_text())
    assert record["total_steps"] == 5 and record["start_from"] == str(pretrained)
    # Another number of slots does not fit the stored head; a text-only checkpoint has no tower.
    assert tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(tmp_path / "x"),
                    "--steps", "1", "--slots", "4", "--start-from", str(pretrained)]) == 2
    assert "does not fit this tower and head" in capsys.readouterr().err
    assert tp.main(["--config", CONFIG, "--base", str(base / "base"), "--out", str(tmp_path / "y"),
                    "--steps", "1", "--start-from", str(base / "base")]) == 2
    assert "does not fit this tower and head" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_base_of_another_architecture_is_refused_by_name(base, tmp_path):
    other = nano_tiny_config().model.replace(hidden_size=48, dtype="float32", param_dtype="float32")
    save_checkpoint(Transformer(other, rngs=nnx.Rngs(0)), tmp_path / "other")
    tower = tp.build_reader(tiny_vision_config().model.vision, 32, 2, 0).tower
    with pytest.raises(KestrelError, match="does not fit the run config's model: .*shape"):
        tp.merge_into_checkpoint(tiny_vision_config().model, tmp_path / "other", tower, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
