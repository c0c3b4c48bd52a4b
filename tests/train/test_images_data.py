"""Rendered problems through the data pipeline and eval: image pad runs, span ids, loss mask, the vision suite."""

import dataclasses
import io

import jax
import numpy as np
import pytest
from PIL import Image

from configs.kestrel_nano_tiny import config as tiny_config
from kestrel.errors import KestrelError
from model import ModelConfig
from model.checkpoint import abstract_params, model_from_params, save_checkpoint
from model.tokenizer import Tokenizer
from train import eval as ev
from train.data import TOKENIZER_ENV, SyntheticBatches, SyntheticDataConfig, synthetic_batches
from train.image_tokens import expand_images, has_vision_tower, image_token_ids
from train.nano_tokenizer import corpus
from train.packing import tokenize_segments
from train.synthetic import SUITES, generate, render_kestrel

N_SOFT = 16


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train_sentencepiece(corpus(200, seed=5), 700, path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def vision_config(tok_dir, **kw):
    kw = {"batch_size": 2, "seq_len": 1536, "seed": 4, "image_tokens": N_SOFT,
          "tasks": (("vision", 3.0), ("arithmetic", 1.0)), **kw}
    return SyntheticDataConfig(tokenizer=tok_dir, **kw)


def test_placeholders_become_pad_runs_outside_the_trained_text(tok):
    ex = generate("image_chart", level=2, seed=1)
    plain = tokenize_segments(tok, render_kestrel(ex))
    image_id, pad_id = image_token_ids(tok)
    assert (plain.ids == image_id).sum() == 1
    out = expand_images(plain, ex.images, image_id, pad_id, N_SOFT)
    assert len(out) == len(plain) + N_SOFT and out.images == tuple(ex.images)
    (start,) = out.image_starts
    # The marker stays and the pads follow it, as the serving side lays prompts out.
    assert out.ids[start - 1] == image_id and (out.ids == image_id).sum() == 1
    assert (out.ids[start:start + N_SOFT] == pad_id).all() and (out.ids == pad_id).sum() == N_SOFT
    assert not out.trainable[start:start + N_SOFT].any()
    np.testing.assert_array_equal(np.delete(out.ids, np.arange(start, start + N_SOFT)), plain.ids)
    assert out.trainable.sum() == plain.trainable.sum()
    with pytest.raises(ValueError, match="of its own"):
        expand_images(out, ex.images, image_id, pad_id, N_SOFT)
    with pytest.raises(ValueError, match="placeholders for 2 images"):
        expand_images(plain, ex.images * 2, image_id, pad_id, N_SOFT)
    trained = dataclasses.replace(plain, trainable=np.ones_like(plain.trainable))
    with pytest.raises(ValueError, match="trained text"):
        expand_images(trained, ex.images, image_id, pad_id, N_SOFT)


def test_batches_carry_the_placed_examples_images_at_their_spans(tok_dir):
    data = SyntheticBatches(vision_config(tok_dir))
    batch, stats, placed = data.builder.build(3)
    tok = data.builder.tokenizer
    image_id, pad_id = image_token_ids(tok)
    spans, images = batch["image_span_ids"], batch["images"]
    assert spans.shape == (2, 1536) and spans.dtype == np.int32
    # The batch's images are the placed examples' images, in placement order, one span each.
    assert images == [png for ex in placed for png in ex.images] and len(images) >= 2
    assert any(not ex.images for ex in placed), "text examples share the batch"
    assert set(np.unique(spans)) == set(range(len(images) + 1))
    for m in range(1, len(images) + 1):
        rows, cols = np.nonzero(spans == m)
        assert len(set(rows)) == 1 and len(cols) == N_SOFT and np.all(np.diff(cols) == 1)
        assert (batch["tokens"][rows, cols] == pad_id).all() and batch["tokens"][rows[0], cols[0] - 1] == image_id
        # A span lies inside one example.
        assert len(set(batch["segment_ids"][rows, cols])) == 1 and batch["segment_ids"][rows[0], cols[0]] > 0
    assert ((batch["tokens"] == pad_id) == (spans > 0)).all() and (batch["tokens"] == image_id).sum() == len(images)
    # No loss on an image pad, nor on predicting one; the loss is still on every assistant answer.
    assert not batch["loss_mask"][spans > 0].any()
    assert not batch["loss_mask"][batch["targets"] == pad_id].any()
    got = []
    for row in range(2):
        seg = batch["segment_ids"][row]
        for k in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == k)
            got.append(tok.decode(batch["targets"][row, idx][batch["loss_mask"][row, idx] > 0]))
    assert sorted(got) == sorted("".join(t for t, trained in render_kestrel(ex) if trained) for ex in placed)
    for png in images:
        assert Image.open(io.BytesIO(png)).format == "PNG"


def test_image_batches_are_deterministic_and_resumable(tok_dir):
    cfg = vision_config(tok_dir)
    a, b = SyntheticBatches(cfg), SyntheticBatches(cfg)
    b.set_state({"next_batch": 1})
    next(a)
    x, y = next(a), next(b)
    for k in ("tokens", "loss_mask", "image_span_ids"):
        np.testing.assert_array_equal(x[k], y[k])
    assert x["images"] == y["images"]


def test_text_only_mixes_keep_the_plain_batch(tok_dir):
    cfg = vision_config(tok_dir, tasks=(("arithmetic", 1.0),))
    assert not cfg.with_images
    assert "images" not in SyntheticBatches(cfg).batch(0)
    with pytest.raises(ValueError, match="image_tokens"):
        vision_config(tok_dir, image_tokens=0)
    with pytest.raises(ValueError, match="unknown task"):
        vision_config(tok_dir, tasks=(("pictures", 1.0),))


def test_image_tasks_need_a_model_with_a_vision_tower(tok_dir, monkeypatch):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=700),
                              data=dataclasses.replace(cfg.data, seq_len=1536, batch_size=2,
                                                       tasks=(("vision", 1.0),)))
    monkeypatch.setenv(TOKENIZER_ENV, tok_dir)
    assert not has_vision_tower(cfg.model)
    with pytest.raises(KestrelError, match="no vision tower"):
        synthetic_batches(cfg)


def test_a_towers_soft_token_count_and_ids_set_the_pad_runs(tok_dir, tok, monkeypatch):
    # A stand-in for a model config with a tower: only the fields the data side reads.
    from types import SimpleNamespace

    image_id, pad_id = image_token_ids(tok)
    monkeypatch.setenv(TOKENIZER_ENV, tok_dir)
    base = tiny_config()

    def run_config(vision, **data):
        model = SimpleNamespace(vocab_size=700, vision=vision)
        return SimpleNamespace(model=model, steps=10, data=dataclasses.replace(
            base.data, seq_len=1536, batch_size=2, tasks=(("vision", 1.0),), **data))

    tower = SimpleNamespace(mm_tokens_per_image=9, image_start_id=image_id, image_token_id=pad_id)
    data = synthetic_batches(run_config(tower))
    assert data.config.image_tokens == 9
    spans = next(data)["image_span_ids"]
    assert all((spans == m).sum() == 9 for m in range(1, spans.max() + 1))
    with pytest.raises(KestrelError, match="soft tokens per image"):
        synthetic_batches(run_config(tower, image_tokens=16))
    with pytest.raises(KestrelError, match="differ"):
        synthetic_batches(run_config(SimpleNamespace(mm_tokens_per_image=9, image_start_id=image_id,
                                                     image_token_id=pad_id + 1)))


@pytest.mark.parametrize("suite, modes", [("vision", {"tools", "no_tools"}), ("reading", {"tools"})])
def test_the_picture_suites_score_the_generators_own_answers_100_and_wrong_ones_0(tok, suite, modes):
    result = ev.evaluate(tok, ev.oracle_policy(tok), suite, n=8, seed=1)
    assert set(result["results"]) == modes and len(result["rows"]) == 8 * len(modes)
    for res in result["results"].values():
        assert set(res["by_task"]) == set(SUITES[suite]) and res["overall"]["accuracy"] == 1.0

    def wrong(convs):
        return [tok.encode("<think>\nNo idea.\n</think>\n\nAnswer: 123456789.5<|im_end|>") for _ in convs]

    result = ev.evaluate(tok, wrong, suite, n=4, seed=1)
    assert all(res["overall"]["accuracy"] == 0.0 for res in result["results"].values())


def test_eval_says_so_when_the_model_has_no_vision_tower(tok, tmp_path, capsys):
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=256)
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
    ckpt = save_checkpoint(model_from_params(cfg, params), tmp_path / "tiny", tokenizer=tok)
    for suite in ("vision", "reading"):
        with pytest.raises(KestrelError, match="no vision tower"):
            ev.run_eval(str(ckpt), suite, n=2, out=None)
    from kestrel.cli import main

    assert main(["eval", str(ckpt), "--suite", "vision", "--n", "2"]) == 2
    assert "has no vision tower" in capsys.readouterr().err


def test_a_tower_needs_a_decoder_that_feeds_it_images():
    from types import SimpleNamespace

    from serve.engine import EngineRequest

    towered = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(mm_tokens_per_image=4)))
    assert has_vision_tower(towered)
    import inspect

    from model.generate import Generator

    if "images" not in inspect.signature(Generator.generate).parameters:
        with pytest.raises(KestrelError, match="--decoder engine"):
            ev.check_takes_images(towered, "ck", engine=False)
    if "images" in {f.name for f in dataclasses.fields(EngineRequest)}:
        ev.check_takes_images(towered, "ck", engine=True)  # the engine splices images itself
    else:
        with pytest.raises(KestrelError, match="engine takes no images"):
            ev.check_takes_images(towered, "ck", engine=True)
