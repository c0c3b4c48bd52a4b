"""The vision tower's config, the image splice, and the mask: bidirectional in an image, causal elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer, init_model
from model.vision import image_span_ids
from model.vision_config import VisionConfig

IMAGE = 63


def vision_config(**changes):
    base = dict(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, image_size=16,
                patch_size=4, mm_tokens_per_image=4, image_token_id=IMAGE)
    return VisionConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, vision=vision_config())
    return init_model(cfg, seed=3)


@pytest.mark.parametrize("changes, message", [
    (dict(image_size=18), "multiple of patch_size"),
    (dict(mm_tokens_per_image=5), "must be a square"),
    (dict(mm_tokens_per_image=9), "must be a square whose side divides"),
    (dict(num_heads=3), "multiple of num_heads"),
    (dict(image_std=(0.5, 0.0, 0.5)), "image_std"),
    (dict(image_mean=(0.5,)), "one value per channel"),
])
def test_bad_vision_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        vision_config(**changes)


def test_config_round_trips_through_json(model):
    cfg = model.config
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.vision, VisionConfig)
    with pytest.raises(ValueError, match="unknown VisionConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "vision": {**cfg.to_dict()["vision"], "colour": 1}})


def test_span_ids_number_each_contiguous_image():
    tokens = jnp.array([[1, IMAGE, IMAGE, 2, IMAGE, 3], [IMAGE, 4, 5, IMAGE, IMAGE, IMAGE]])
    np.testing.assert_array_equal(image_span_ids(tokens, IMAGE),
                                  [[0, 1, 1, 0, 2, 0], [1, 0, 0, 2, 2, 2]])


def test_image_span_is_bidirectional_and_text_causal(model):
    """Changing one soft token moves every position of its image (before it too) and every
    later position, but no position before the image; changing a text token moves only later ones."""
    tokens = jnp.array([[1, 2, IMAGE, IMAGE, IMAGE, IMAGE, 5, 6, 7]])
    soft = jax.random.normal(jax.random.key(0), (1, 4, 32))
    run = nnx.jit(lambda m, t, e: m(t, image_embeddings=e)[0])
    base = np.asarray(run(model, tokens, soft))
    moved = np.abs(np.asarray(run(model, tokens, soft.at[0, 3].add(1.0))) - base).max(-1)[0]
    assert (moved[:2] == 0).all(), "text before the image must not see it"
    assert (moved[2:] > 1e-6).all(), "every image position sees the image's last soft token"
    text = np.abs(np.asarray(run(model, tokens.at[0, 7].set(9), soft)) - base).max(-1)[0]
    assert (text[:7] == 0).all() and text[7:].min() > 1e-6


def test_images_equal_their_embeddings(model):
    pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    tokens = jnp.array([[1] + [IMAGE] * 4 + [2] + [IMAGE] * 4 + [3]])
    soft = nnx.jit(lambda m, x: m.encode_images(x))(model, pixels)
    with_images = nnx.jit(lambda m, t, x: m(t, images=x)[0])
    a = with_images(model, tokens, pixels)
    b = nnx.jit(lambda m, t, e: m(t, image_embeddings=e)[0])(model, tokens, soft)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The second image's soft tokens land at the second span: swapping the images changes logits.
    c = with_images(model, tokens, pixels[::-1])
    assert np.abs(np.asarray(c) - np.asarray(a))[0, 6:].max() > 1e-4


def test_a_text_only_model_refuses_images():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48)
    text_only = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no vision tower"):
        text_only(jnp.array([[1, 2]]), images=jnp.zeros((1, 16, 16, 3)))
