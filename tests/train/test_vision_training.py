"""The training loop with images: rendered problems reach the vision tower inside the jitted step.

configs/nano_vision_tiny.py (a 32 px tower, 4 soft tokens per image) trains on the synthetic mix
with the vision suite: the loss falls, every tower parameter moves, the images change the loss,
image batches compile once, and a text-only batch still trains the vision model on the text step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.nano_vision_tiny import config as tiny_vision_config
from kestrel.errors import KestrelError
from model.tokenizer import Tokenizer
from model.transformer import init_model
from model.vision import splice_images_by_span
from train import loop
from train.image_batch import image_inputs
from train.image_tokens import image_token_ids
from train.nano_tokenizer import corpus

STEPS = 6


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train_sentencepiece(corpus(200, seed=5), 700, path)
    return str(path)


def vision_cfg(tok_dir, **data):
    cfg = tiny_vision_config()
    # No weight decay: a tower parameter then moves only if its gradient is non-zero.
    return dataclasses.replace(
        cfg, steps=STEPS, optimizer=dataclasses.replace(cfg.optimizer, weight_decay=0.0,
                                                         learning_rate=1e-2),
        data=dataclasses.replace(cfg.data, tokenizer=tok_dir, **data))


def tower_params(params):
    return jax.tree.map(np.asarray, params["vision"])


def tower_names(params):
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params["vision"])[0]]


def tower_moves(before, after):
    """Per tower parameter: whether it moved by more than the rounding that separates the eager
    initialisation here from the loop's jitted one (~1e-8; one Adam step moves ~1e-3)."""
    moves = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))) > 1e-5,
                         tower_params(before), tower_params(after))
    return jax.tree.leaves(moves)


@pytest.fixture(scope="module")
def trained(tok_dir, tmp_path_factory):
    cfg = vision_cfg(tok_dir)
    initial = nnx.to_pure_dict(nnx.state(init_model(cfg.student, cfg.seed), nnx.Param))
    result = loop.run(cfg, tmp_path_factory.mktemp("run"), devices=jax.devices()[:1],
                      report=lambda _: None)
    return cfg, initial, result


def test_the_tokenizer_ids_are_the_towers(tok_dir):
    vision = tiny_vision_config().model.vision
    assert image_token_ids(Tokenizer.load(tok_dir)) == (vision.image_start_id, vision.image_token_id)


def test_loss_falls_on_a_mix_with_images(trained):
    cfg, _, result = trained
    assert set(result.losses) == set(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in result.losses.values())
    assert result.losses[STEPS] < result.losses[1] - 0.3, result.losses


def test_every_tower_parameter_gets_a_gradient(trained):
    _, initial, result = trained
    moved = dict(zip(tower_names(initial), tower_moves(initial, result.params)))
    # A key bias adds the same logit to every key of a query, which softmax ignores: its
    # gradient is zero by construction. Every other tower parameter must learn.
    learnt = {name: m for name, m in moved.items() if not name.endswith("['k_bias']")}
    assert len(learnt) == len(moved) - 1 and all(learnt.values()), moved


def test_image_batches_compile_once(trained):
    cfg, _, _ = trained
    jitted = [v for k, v in loop._JIT_CACHE.items() if repr(cfg.student) in k[0]]
    assert jitted, "the run's jitted functions are cached"
    _, _, steps = jitted[-1]  # keyed by (images, every position's logits)
    assert steps[True, False]._cache_size() == 1  # six batches with different image counts, one program
    assert steps[False, False]._cache_size() == 0  # every batch of this mix carried images
    assert steps[True, True] is steps[True, False]  # logits_share 1: one step computes every logit


def _one_image_batch(cfg):
    data = loop.make_batches(cfg)
    for _ in range(10):
        raw = next(data)
        if raw["images"]:
            return raw
    raise AssertionError("ten batches of the mix without an image")


def test_the_images_change_the_loss(trained):
    cfg, _, _ = trained
    raw = _one_image_batch(cfg)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sharding = NamedSharding(mesh, P("data"))
    batch = loop.shard_batch(raw, sharding, cfg.data.batch_size, cfg.data.seq_len,
                             vision=cfg.student.vision, max_images=cfg.data.max_images)
    assert batch["pixels"].shape == (cfg.data.max_images, 32, 32, 3)
    assert int(batch["image_count"]) == len(raw["images"])
    batch = {k: np.asarray(v) for k, v in batch.items()}  # this test's step runs on no mesh
    model = init_model(cfg.student, cfg.seed)
    graphdef, state = nnx.split(model, nnx.Param)
    tx, _ = loop.make_optimizer(cfg.optimizer, cfg.steps)
    step = jax.jit(loop.make_train_step(graphdef, tx, cfg))
    params = nnx.to_pure_dict(state)

    def loss(pixels):
        fresh = jax.tree.map(jnp.copy, params)
        out = step(fresh, tx.init(fresh), loop.host_rng(0), {**batch, "pixels": pixels}, None,
                   np.int32(0))[3]
        return float(out["loss"])

    real, blank = loss(batch["pixels"]), loss(np.zeros_like(batch["pixels"]))
    assert np.isfinite(real) and np.isfinite(blank) and abs(real - blank) > 1e-6
    # Padding past the real images is masked: changing it changes nothing.
    noise = batch["pixels"].copy()
    noise[len(raw["images"]):] = 1.0
    assert loss(noise) == real


def test_a_text_only_batch_trains_the_vision_model(tok_dir, tmp_path):
    cfg = vision_cfg(tok_dir, tasks=(("arithmetic", 1.0),))
    cfg = dataclasses.replace(cfg, steps=1)
    initial = nnx.to_pure_dict(nnx.state(init_model(cfg.student, cfg.seed), nnx.Param))
    result = loop.run(cfg, tmp_path / "run", devices=jax.devices()[:1], report=lambda _: None)
    assert all(np.isfinite(v) for v in result.losses.values())
    # The text step: the tower is untouched (no gradient, no decay), the text model trained.
    assert not any(tower_moves(initial, result.params))
    embed_moved = np.abs(np.asarray(initial["embed"]["table"]) - np.asarray(result.params["embed"]["table"]))
    assert embed_moved.max() > 1e-5


def test_bad_image_batches_are_refused_on_the_host(trained):
    cfg, _, _ = trained
    vision = cfg.student.vision
    raw = _one_image_batch(cfg)
    with pytest.raises(ValueError, match="over data.max_images=0"):
        image_inputs(raw, vision, 0)
    with pytest.raises(ValueError, match="batch carries 0 images"):
        image_inputs({**raw, "images": []}, vision, 8)
    short = raw["image_span_ids"].copy()
    short[short == 1] = 0
    short[np.unravel_index(np.argmax(raw["image_span_ids"] == 1), short.shape)] = 1
    with pytest.raises(ValueError, match=r"spans \[1\] do not hold the tower's 4"):
        image_inputs({**raw, "image_span_ids": short}, vision, 8)
    with pytest.raises(ValueError, match="image 0 of the batch"):
        image_inputs({**raw, "images": [b"not a png"] + list(raw["images"][1:])}, vision, 8)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="no vision tower"):
        loop.shard_batch(raw, NamedSharding(mesh, P("data")), cfg.data.batch_size, cfg.data.seq_len)


def test_spans_pick_their_image_whatever_the_reading_order():
    # Row 0 holds image 2 (span id 2), row 1 image 1: ids, not reading order, name the image.
    spans = jnp.array([[0, 2, 2, 0], [1, 1, 0, 0]], jnp.int32)
    soft = jnp.array([[[1.0], [2.0]], [[3.0], [4.0]]])  # [I=2, M=2, D=1]
    out = splice_images_by_span(jnp.zeros((2, 4, 1)) - 1, spans, soft)
    np.testing.assert_array_equal(out[..., 0], [[-1, 3, 4, -1], [1, 2, -1, -1]])
