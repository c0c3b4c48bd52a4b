"""The vision tower's config, the image splice, and the mask: bidirectional in an image, causal elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer, init_model
from model.checkpoint import flatten_params
from model.vision import VisionTower, image_span_ids
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
    (dict(stem_channels=(8, 8, 8)), "multiple of 8: each of the 3 stem convolutions"),
    (dict(stem_channels=(8, 0)), "stem_channels .* must be positive"),
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


def _conv_stride2_same(x, kernel, bias):
    """A 3 x 3, stride-2 convolution with TensorFlow's SAME padding (the extra row and column after
    the picture), then tanh-GELU, written out in numpy."""
    b, s, _, cin = x.shape
    out = s // 2
    padded = np.zeros((b, s + 1, s + 1, cin), np.float64)
    padded[:, :s, :s] = x
    y = np.zeros((b, out, out, kernel.shape[-1]))
    for i in range(out):
        for j in range(out):
            window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # [B, 3, 3, Cin]
            y[:, i, j] = np.einsum("byxc,yxco->bo", window, kernel)
    y = y + bias
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))


def test_a_convolutional_stem_feeds_the_patch_embedding():
    """With stem_channels the patch embedding reads the stem's feature map in patch_size / 2**k
    squares: a numpy reference of both convolutions and the patch matmul gives the same patches,
    and the parameter count matches the tree's."""
    # 16 px pictures, 8 px patches: a 2 x 2 grid, each patch a 2 x 2 square of the stem's 4 px map,
    # so the reference also fixes the (y, x, channel) order inside a patch.
    cfg = vision_config(stem_channels=(5, 6), patch_size=8)
    tower = VisionTower(cfg, 32, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(4))
    flat = {k: np.asarray(v, np.float64) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(tower, nnx.Param))).items()}
    assert sum(v.size for v in flat.values()) == cfg.num_params + cfg.hidden_size * 32
    assert flat["patch_embed"].shape == (2 * 2 * 6, 16)
    pixels = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3))
    x = _conv_stride2_same(pixels, flat["stem/0/kernel"], flat["stem/0/bias"])
    x = _conv_stride2_same(x, flat["stem/1/kernel"], flat["stem/1/bias"])  # [2, 4, 4, 6]
    patches = np.stack([x[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(2, -1) for r in range(2) for c in range(2)], 1)
    want = patches @ flat["patch_embed"] + flat["patch_bias"] + flat["position_embed"]
    got = np.asarray(tower.patches(jnp.asarray(pixels, jnp.float32)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    again = ModelConfig.from_json(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                              num_kv_heads=2, head_dim=8, intermediate_size=48,
                                              vision=cfg).to_json())
    assert again.vision == cfg and again.vision.stem_channels == (5, 6)


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
