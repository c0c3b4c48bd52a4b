"""Images through the engine: prefill splices soft tokens (equal to a full forward pass), the
embedding cache encodes each image once per conversation and batch, page keys hold the image,
chunks never split an image span, and every bad image is refused at submit while serving goes on."""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from model.config import ModelConfig
from model.image_processing import ImageLimits, load_image
from model.transformer import init_model
from model.vision_config import VisionConfig
from serve import events as ev
from serve.engine import Engine, EngineRequest
from serve.image_prompt import split_image_parts
from serve.request import SamplingParams
from test_engine import PAGE, tiny_tokenizer
from test_runner import SLIDING, VOCAB

M = 4  # soft tokens per image


@functools.lru_cache(maxsize=None)
def vision_model():
    tok = tiny_tokenizer()
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          image_size=16, patch_size=4, mm_tokens_per_image=M,
                          image_token_id=tok.token_to_id("<|image_pad|>"),
                          image_start_id=tok.token_to_id("<image>"))
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=1024, vision=vision,
                      **SLIDING)
    model = init_model(cfg, 1)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params))
    return model


def make_engine(**kw):
    opts = dict(num_pages=128, page_size=PAGE, max_num_seqs=8, max_num_batched_tokens=32,
                prefill_chunk_size=8)
    opts.update(kw)
    return Engine(vision_model(), tiny_tokenizer(), **opts)


def png(seed: int, size=(20, 12)) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


def user(text, *images, before=""):
    parts = ([{"type": "text", "text": before}] if before else []) + \
        [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def greedy(n=6, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_prefill_with_an_image_equals_the_full_forward_pass():
    engine = make_engine()
    tok = tiny_tokenizer()
    start = tok.token_to_id("<image>")
    prompt = tok.encode("The quick brown fox") + [start] + tok.encode("jumps over the lazy dog.")
    h = engine.submit(EngineRequest(prompt_token_ids=prompt, images=[png(1)], channels=False,
                                    params=greedy(1, logprobs=True, top_logprobs=5)))
    engine.run_until_idle()
    ids = h.prompt_token_ids
    span = h.request.mm_spans[0]
    assert ids[span.offset - 1] == start and span.length == M
    assert ids[span.offset:span.offset + M] == (vision_model().config.vision.image_token_id,) * M
    # The chunk of 8 would end inside the image span; the scheduler cut it before the span.
    assert span.offset % 8 != 0
    pixels = load_image(png(1), vision_model().config.vision)[None]
    logits = nnx.jit(lambda m, t, x: m(t, images=x)[0])(vision_model(), jnp.asarray([ids]), jnp.asarray(pixels))
    want = np.asarray(jax.nn.log_softmax(logits[0, -1]))
    top = h.logprobs[0].top_logprobs
    assert top[0][0] == int(np.argmax(want))
    np.testing.assert_allclose([lp for _, lp in top], want[[t for t, _ in top]], atol=2e-4)
    assert h.usage.image_tokens == M
    assert engine.kv.pool.num_used == 0


def test_second_turn_about_the_same_image_encodes_nothing():
    engine = make_engine()
    first = [user("What is in the picture?", png(2))]
    h1 = engine.submit(EngineRequest(messages=first, channels=False, params=greedy()))
    engine.run_until_idle()
    assert engine.runner.images.num_encoded == 1
    # A stateless client sends the whole conversation again, image included.
    again = first + [{"role": "assistant", "content": h1.text()}, user("And the colours?")]
    h2 = engine.submit(EngineRequest(messages=again, channels=False, params=greedy()))
    engine.run_until_idle()
    assert engine.runner.images.num_encoded == 1
    assert h2.usage.cached_input_tokens > h1.request.mm_spans[0].offset + M
    # Continuing by previous_response_id keeps the image too, and encodes nothing either.
    h3 = engine.submit(EngineRequest(messages=[user("Is it square?")], channels=False,
                                     previous_response_id=h2.request_id, params=greedy()))
    engine.run_until_idle()
    assert h3.request.mm_spans == h2.request.mm_spans
    assert h3.usage.image_tokens == M
    assert engine.runner.images.num_encoded == 1
    assert engine.kv.pool.num_used == 0


def test_one_image_in_a_batch_is_encoded_once():
    engine = make_engine()
    hs = [engine.submit(EngineRequest(messages=[user(q, png(3))], channels=False, params=greedy(2)))
          for q in ("Describe it.", "Count the dogs.", "Any text?")]
    engine.run_until_idle()
    assert all(h.finished for h in hs)
    assert engine.runner.images.num_encoded == 1


def test_different_images_never_share_pages():
    engine = make_engine(prefill_chunk_size=16, max_num_batched_tokens=64)
    text = "The answer is 42 because 6 * 7 = 42."
    a = engine.submit(EngineRequest(messages=[user(text, png(4))], channels=False, params=greedy()))
    engine.run_until_idle()
    b = engine.submit(EngineRequest(messages=[user(text, png(5))], channels=False, params=greedy()))
    engine.run_until_idle()
    span = b.request.mm_spans[0]
    assert a.prompt_token_ids == b.prompt_token_ids  # the same tokens: only the image differs
    assert b.usage.cached_input_tokens <= span.offset // PAGE * PAGE
    assert engine.runner.images.num_encoded == 2
    same = engine.submit(EngineRequest(messages=[user(text, png(4))], channels=False, params=greedy()))
    engine.run_until_idle()
    assert same.usage.cached_input_tokens > span.offset + M
    assert same.output_token_ids == a.output_token_ids


def animated_gif(frames: int) -> bytes:
    images = [Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


@pytest.mark.parametrize("images, message", [
    ([b"not an image at all"], "image 0: data is not an image"),
    ([png(6)[:200]], "image 0: PNG image is truncated or corrupt"),
    ([png(7, size=(300, 300))], "image 0: image is 300x300 = 90000 pixels, over the limit of 10000"),
    ([animated_gif(5)], "image 0: animated GIF has 5 frames, over the limit of 3"),
    ([png(8)] * 3, "has 3 images; the limit is 2 per request"),
])
def test_bad_images_are_refused_and_serving_goes_on(images, message):
    engine = make_engine(image_limits=ImageLimits(max_pixels=10_000, max_frames=3), max_images_per_request=2)
    with pytest.raises(ValueError, match=message):
        engine.submit(EngineRequest(messages=[user("What is it?", *images)], channels=False))
    assert not engine.has_work()
    ok = engine.submit(EngineRequest(messages=[user("What is it?", png(9))], channels=False, params=greedy(2)))
    engine.run_until_idle()
    assert ok.finished and ok.finish_reason in ("stop", "length")
    assert engine.kv.pool.num_used == 0


def test_images_need_a_vision_model_and_a_marker_each():
    # A text-only engine has no marker; its refusal is this one (and the API's, test_grpc_errors).
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: this model does not take images"):
        split_image_parts([user("hi", png(1))], None)
    engine = make_engine()
    with pytest.raises(ValueError, match="2 image markers for 1 images"):
        engine.submit(EngineRequest(messages=[user("a <image> b", png(1))], channels=False))
    with pytest.raises(ValueError, match="user messages only"):
        engine.submit(EngineRequest(messages=[
            {"role": "system", "content": [{"type": "image", "image": png(1)}]},
            {"role": "user", "content": "hi"}], channels=False))
    with pytest.raises(ValueError, match="takes 4 tokens, more than the prefill chunk of 2"):
        make_engine(prefill_chunk_size=2).submit(EngineRequest(messages=[user("hi", png(1))], channels=False))


def test_a_prefix_hit_ending_inside_an_image_span_continues_it_exactly():
    """Pages [0, 8) come from the cache and the image's span is [6, 10): the next chunk starts
    inside the span; its log-probs equal a run without the prefix cache."""
    tok = tiny_tokenizer()
    head = tok.encode("The quick brown fox")[:5] + [tok.token_to_id("<image>")]
    assert len(head) == 6
    a = head + tok.encode("jumps over")
    b = head + tok.encode("hello world")
    outputs = []
    for caching in (True, False):
        engine = make_engine(enable_prefix_caching=caching)
        params = greedy(1, logprobs=True, top_logprobs=5)
        engine.submit(EngineRequest(prompt_token_ids=a, images=[png(10)], channels=False, params=params))
        engine.run_until_idle()
        h = engine.submit(EngineRequest(prompt_token_ids=b, images=[png(10)], channels=False, params=params))
        engine.run_until_idle()
        assert h.request.mm_spans[0].offset == 6
        outputs.append((h.usage.cached_input_tokens, h.logprobs[0].top_logprobs))
    (hit, cached), (no_hit, fresh) = outputs
    assert hit == 8 and no_hit == 0
    assert [t for t, _ in cached] == [t for t, _ in fresh]
    np.testing.assert_allclose([lp for _, lp in cached], [lp for _, lp in fresh], atol=1e-5)


def test_cache_salt_isolates_encoded_images():
    """As for prefix pages, requests share an encoded image only under the same ``cache_salt``:
    another tenant's image costs a fresh encode, so its earlier presence cannot be timed."""
    engine = make_engine()
    for salt in ("tenant-a", "tenant-b", "tenant-a", None):
        engine.submit(EngineRequest(messages=[user("Describe it.", png(6))], channels=False,
                                    cache_salt=salt, params=greedy(2)))
        engine.run_until_idle()
    assert engine.runner.images.num_encoded == 3  # a, b, unsalted; the second a reused its own
    assert engine.kv.pool.num_used == 0
