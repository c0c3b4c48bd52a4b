"""Gemma 3 multimodal (Gemma3ForConditionalGeneration) through `kestrel convert`: parity with
transformers on a random tiny config for tower features, soft tokens and interleaved log-probs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import randomize
from kestrel.cli import main as kestrel_main
from kestrel.errors import KestrelError
from model.checkpoint import load_checkpoint
from model.convert import convert_checkpoint

IMAGE, BOI, EOI = 79, 77, 78
TOL = 1e-4


def tiny_gemma3_vlm(seed=0):
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                layer_types=["sliding_attention", "full_attention"], sliding_window=3)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=IMAGE, boi_token_index=BOI,
                                       eoi_token_index=EOI)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    model.config._attn_implementation = "eager"
    return randomize(model)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(hf model, kestrel model): a tiny random Gemma 3 VLM converted with `kestrel convert`."""
    tmp = tmp_path_factory.mktemp("gemma3_vlm")
    hf = tiny_gemma3_vlm()
    hf.save_pretrained(tmp / "hf")
    (tmp / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    with pytest.warns(UserWarning, match="no tokenizer"):
        assert kestrel_main(["convert", str(tmp / "hf"), "--out", str(tmp / "ckpt")]) == 0
    model, _ = load_checkpoint(tmp / "ckpt")
    return hf, model


def pixels(n, seed=1):
    """n random images: NCHW for transformers, NHWC for Kestrel."""
    nchw = np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)
    return torch.from_numpy(nchw), jnp.asarray(nchw.transpose(0, 2, 3, 1))


def interleaved():
    """Two images between text, as Gemma 3's processor lays them out (boi, soft tokens, eoi)."""
    img = [BOI] + [IMAGE] * 4 + [EOI]
    return np.array([[2, 5, 6] + img + [7, 8, 9] + img + [10, 11]])


def test_config_carries_the_tower(converted):
    _, model = converted
    v = model.config.vision
    assert model.config.architecture == "gemma3"
    assert (v.hidden_size, v.num_layers, v.image_size, v.patch_size, v.mm_tokens_per_image) == (24, 2, 32, 8, 4)
    assert (v.image_token_id, v.image_start_id, v.image_end_id) == (IMAGE, BOI, EOI)


def test_tower_features_match(converted):
    hf, model = converted
    pt, px = pixels(2)
    with torch.no_grad():
        want = hf.model.vision_tower(pixel_values=pt).last_hidden_state.numpy()
    got = nnx.jit(lambda m, x: m.vision.features(x))(model, px)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_soft_tokens_match(converted):
    hf, model = converted
    pt, px = pixels(2)
    with torch.no_grad():
        want = hf.model.get_image_features(pt).pooler_output.numpy()
    got = nnx.jit(lambda m, x: m.encode_images(x))(model, px)
    assert got.shape == (2, 4, 32)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_interleaved_log_probs_match(converted):
    hf, model = converted
    tokens = interleaved()
    pt, px = pixels(2)
    ids = torch.as_tensor(tokens)
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pt, token_type_ids=(ids == IMAGE).long()).logits
        want = torch.log_softmax(logits, -1).numpy()
        causal_only = torch.log_softmax(hf(input_ids=ids, pixel_values=pt).logits, -1).numpy()
    got = nnx.jit(lambda m, t, x: jax.nn.log_softmax(m(t, images=x)[0]))(model, jnp.asarray(tokens), px)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    # The comparison has power: without the bidirectional image spans the log-probs differ.
    assert np.abs(causal_only - want).max() > 1e-2


def test_wrong_placeholder_count_is_refused(converted):
    _, model = converted
    _, px = pixels(1)
    with pytest.raises(ValueError, match="4 image placeholders but 2 images give 8 soft tokens"):
        model(jnp.asarray([[2] + [IMAGE] * 4 + [3]]), images=jnp.concatenate([px, px]))


def test_missing_vision_tensor_is_named(tmp_path):
    hf = tiny_gemma3_vlm()
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("encoder.layers.1.mlp.fc2.bias"))
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(KestrelError, match=r"missing tensor 'vision_tower\.encoder\.layers\.1\.mlp\.fc2\.bias'"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")


def test_export_of_a_vision_model_is_refused_clearly(converted):
    from model.convert import hf_config_from_model
    _, model = converted
    with pytest.raises(KestrelError, match="export of models with a vision tower is not supported"):
        hf_config_from_model(model.config)


@pytest.mark.slow
def test_served_log_probs_match_transformers(converted):
    """The engine (paged cache, chunked prefill cut before the image, embedding cache, sliding
    layers) gives the log-probs transformers gives after an interleaved image+text prompt."""
    import io

    from PIL import Image

    from model.image_processing import load_image
    from serve.engine import Engine, EngineRequest
    from serve.request import SamplingParams

    hf, model = converted
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    engine = Engine(model, None, num_pages=64, page_size=4, max_num_seqs=2, max_num_batched_tokens=16,
                    prefill_chunk_size=8)
    prompt = [2, 5, 6, 7, 8, BOI, 9, 10, 11, 12]  # the image's span follows BOI
    h = engine.submit(EngineRequest(prompt_token_ids=prompt, images=[data], channels=False,
                                    params=SamplingParams(max_tokens=1, temperature=0.0, logprobs=True,
                                                          top_logprobs=5)))
    engine.run_until_idle()
    ids = torch.as_tensor([h.prompt_token_ids])
    assert h.prompt_token_ids[:11] == (2, 5, 6, 7, 8, BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI)
    pixels = torch.from_numpy(load_image(data, model.config.vision).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE).long()).logits
    want = torch.log_softmax(logits[0, -1], -1).numpy()
    top = h.logprobs[0].top_logprobs
    assert top[0][0] == int(np.argmax(want))
    np.testing.assert_allclose([lp for _, lp in top], want[[t for t, _ in top]], atol=TOL)
