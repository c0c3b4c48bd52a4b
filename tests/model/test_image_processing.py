"""Image decoding with limits and Gemma 3's preprocessing (checked against transformers)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.image_processing import (ImageError, ImageLimits, content_hash, decode, load_image,
                                    preprocess)
from model.vision_config import VisionConfig

CFG = VisionConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, image_size=32,
                   patch_size=8, mm_tokens_per_image=4, image_token_id=1)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(w=40, h=24, mode="RGB", seed=0) -> Image.Image:
    channels = len(mode)
    data = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(data if channels > 1 else data[..., 0], mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds almost no pixel data (a bomb)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def test_matches_transformers_gemma3_processor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    image = noise()
    want = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)(image, return_tensors="np")["pixel_values"][0]
    got = load_image(encode(image, "PNG"), CFG)
    assert got.shape == (32, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=1e-6)


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}),
                                         ("GIF", {})])
def test_supported_formats_decode(fmt, kwargs):
    image = decode(encode(noise(), fmt, **kwargs))
    assert image.mode == "RGB" and image.size == (40, 24)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(noise(40, 24), "JPEG", exif=exif.tobytes())
    assert decode(data).size == (24, 40)


def test_transparency_is_composited_onto_white():
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    np.testing.assert_array_equal(np.asarray(decode(encode(clear, "PNG"))), 255)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(decode(buf.getvalue()))
    assert tuple(first[0, 0]) == (255, 0, 0)
    with pytest.raises(ImageError, match="animated GIF has 3 frames, over the limit of 2"):
        decode(buf.getvalue(), ImageLimits(max_frames=2))


def test_bytes_that_are_not_an_image():
    with pytest.raises(ImageError, match="not an image of a supported format"):
        decode(b"hello, this is text and not a picture")
    with pytest.raises(ImageError, match="empty"):
        decode(b"")


def test_unsupported_format_is_refused():
    with pytest.raises(ImageError, match=r"not an image of a supported format \(PNG, JPEG, WEBP, GIF\)"):
        decode(encode(noise(), "BMP"))


def test_truncated_png():
    data = encode(noise(64, 64), "PNG")
    with pytest.raises(ImageError, match="PNG image is truncated or corrupt"):
        decode(data[: len(data) // 2])


def test_pixel_bomb_is_refused_from_its_header():
    # 12000 x 12000 RGB would need 432 MB decoded; the file is a few dozen bytes.
    data = png_header_only(12_000, 12_000)
    assert len(data) < 200
    with pytest.raises(ImageError, match=r"12000x12000 = 144000000 pixels.*refused before decoding"):
        decode(data)
    # Beyond twice Pillow's own limit, Pillow refuses at open: also before decoding.
    with pytest.raises(ImageError, match=r"too large \(refused before decoding\)"):
        decode(png_header_only(30_000, 30_000))
    with pytest.raises(ImageError, match="over the limit of 100"):
        decode(encode(noise(20, 20), "PNG"), ImageLimits(max_pixels=100))


def test_encoded_size_limit():
    data = encode(noise(), "PNG")
    with pytest.raises(ImageError, match=f"{len(data)} bytes, over the limit of 100"):
        decode(data, ImageLimits(max_bytes=100))


def test_preprocess_normalises_with_the_config():
    white = Image.new("RGB", (5, 7), (255, 255, 255))
    np.testing.assert_allclose(preprocess(white, CFG), 1.0, atol=1e-6)
    black = preprocess(Image.new("RGB", (5, 7), (0, 0, 0)), CFG)
    np.testing.assert_allclose(black, -1.0, atol=1e-6)


def test_content_hash_tells_images_apart():
    a, b = encode(noise(seed=1), "PNG"), encode(noise(seed=2), "PNG")
    assert content_hash(a) == content_hash(bytes(a)) != content_hash(b)
