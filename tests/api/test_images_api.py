"""Images through the API: gRPC InputImage, the gateway's image_url data URLs (Chat Completions)
and input_image (Responses); remote URLs and bad images refused with 400 while serving goes on."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import MODEL_ID, make_server
from model.config import ModelConfig
from model.transformer import init_model
from model.vision_config import VisionConfig
from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from serve.engine import Engine

M = 4
# A server of its own with a vision model: its steps compile apart from the package's engine.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vision_server(tokenizer):
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16,
                          patch_size=4, mm_tokens_per_image=M,
                          image_token_id=tokenizer.token_to_id("<|image_pad|>"),
                          image_start_id=tokenizer.token_to_id("<image>"))
    vocab = (tokenizer.vocab_size + 31) // 32 * 32
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=1024, vision=vision)
    engine = Engine(init_model(cfg, 0), tokenizer, num_pages=64, page_size=16, max_num_seqs=4,
                    max_num_batched_tokens=256, prefill_chunk_size=32)
    engine.runner.min_table_pages = 64
    engine.start()
    with make_server(engine) as s:
        yield s
    engine.stop()


def png(seed: int = 0, size=(12, 10)) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def post(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.http_base + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(server, image_part: dict) -> tuple[int, dict]:
    return post(server, "/v1/chat/completions", {
        "model": MODEL_ID, "max_tokens": 4, "reasoning_effort": "none",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part]}]})


def test_models_say_they_take_images(vision_server, server):
    with grpc.insecure_channel(vision_server.target) as ch:
        assert pb_grpc.KestrelStub(ch).ListModels(pb.ListModelsRequest()).models[0].supports_images
    with grpc.insecure_channel(server.target) as ch:
        assert not pb_grpc.KestrelStub(ch).ListModels(pb.ListModelsRequest()).models[0].supports_images


def test_chat_completion_with_a_data_url_counts_image_tokens(vision_server):
    status, body = chat(vision_server, {"type": "image_url", "image_url": {"url": data_url(png(1))}})
    assert status == 200, body
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == M


def test_responses_input_image(vision_server):
    status, body = post(vision_server, "/v1/responses", {
        "model": MODEL_ID, "max_output_tokens": 4, "reasoning": {"effort": "none"},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Describe it."},
                                                {"type": "input_image", "image_url": data_url(png(2))}]}]})
    assert status == 200, body
    assert body["usage"]["input_tokens_details"]["image_tokens"] == M


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "'https' URLs are not fetched"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "must be base64"),
    ({"type": "image_url", "image_url": {"url": data_url(b"plain text, no image")}}, "image 0: data is not an image"),
    ({"type": "image_url", "image_url": {"url": data_url(png(3, (64, 64))[:300])}}, "PNG image is truncated"),
])
def test_bad_images_get_400_and_serving_goes_on(vision_server, part, message):
    status, body = chat(vision_server, part)
    assert status == 400 and message in body["error"]["message"], body
    ok, body = chat(vision_server, {"type": "image_url", "image_url": {"url": data_url(png(4))}})
    assert ok == 200, body


def test_grpc_image_part_and_refusals(vision_server, server):
    def create(target, *parts, role=pb.ROLE_USER):
        req = pb.CreateRequest(model=MODEL_ID, max_output_tokens=4,
                               reasoning=pb.Reasoning(effort=pb.REASONING_EFFORT_NONE),
                               input=[pb.InputItem(message=pb.InputMessage(role=role, content=list(parts)))])
        with grpc.insecure_channel(target) as ch:
            return list(pb_grpc.KestrelStub(ch).Create(req, timeout=60))

    image = pb.InputContent(image=pb.InputImage(data=png(5), mime_type="image/png"))
    events = create(vision_server.target, pb.InputContent(text="What is it?"), image)
    last = events[-1].WhichOneof("event")
    assert last in ("completed", "incomplete")  # a random model may run out of its 4 tokens
    assert getattr(events[-1], last).usage.image_tokens == M
    with pytest.raises(grpc.RpcError) as e:
        create(server.target, pb.InputContent(text="hi"), image)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not take images" in e.value.details()
    bmp = pb.InputContent(image=pb.InputImage(data=png(5), mime_type="image/bmp"))
    with pytest.raises(grpc.RpcError) as e:
        create(vision_server.target, pb.InputContent(text="hi"), bmp)
    assert "mime_type 'image/bmp' is not supported" in e.value.details()


def test_kestrel_chat_sends_an_image_file(vision_server, tmp_path):
    import argparse

    from serve.chat_cli import add_chat_arguments, chat_main

    path = tmp_path / "photo.png"
    path.write_bytes(png(6))
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    args = parser.parse_args(["What is in it?", "--server", vision_server.target, "--image", str(path),
                              "--effort", "none", "--max-output-tokens", "4", "--no-color"])
    images = vision_server.server.engine.runner.images
    before = images.num_encoded
    out = io.StringIO()
    chat_main(args, out)
    assert images.num_encoded == before + 1
    assert f"{M} image)" in out.getvalue()  # the usage line counts the image's tokens
