"""Image bytes -> the vision tower's input: Pillow decoding with limits, then Gemma 3's preprocessing.

Every check that can run before decoding does: the encoded size, the format (PNG, JPEG, WebP,
GIF only), the pixel count read from the header by ``Image.open`` (which decodes nothing), and
the frame count of animated files. A decompression bomb is refused from its header, a truncated or
corrupt file when Pillow decodes it; each with an ``ImageError`` naming the problem.

Preprocessing is ``transformers``' Gemma3ImageProcessor (its PIL backend): EXIF orientation
applied, transparency composited onto white, RGB, a bilinear resize to the tower's square
resolution (aspect ratio not kept, as Gemma 3 does), scaling to [0, 1] and per-channel
normalisation. The result is channels-last [S, S, C] float32, the layout ``VisionTower`` takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kestrel.errors import KestrelError
from model.vision_config import VisionConfig

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class ImageError(KestrelError):
    """An image the server refuses: not an image, corrupt, too large or of an unsupported kind."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What one image may cost before it is decoded.

    Attributes:
      max_bytes: the encoded size.
      max_pixels: width x height, from the header (Pillow's own bomb limit is ~89M).
      max_frames: frames of an animated GIF/WebP/PNG (only the first is used, but every frame
        is a decode cost an attacker can multiply).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_frames: int = 64

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer")


def content_hash(data: bytes) -> str:
    """The identity of an image for caches: a hash of its encoded bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decodes the first frame of an image, upright (EXIF orientation applied), as RGB.

    Raises:
      ImageError: the bytes exceed a limit, are not an image of a supported format, or are
        truncated or corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) before its own error; our limit is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"data is not an image of a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large (refused before decoding): {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"image header is corrupt: {e}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.max_pixels} (refused before decoding)")
    frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    if frames > limits.max_frames:
        raise ImageError(f"animated {image.format} has {frames} frames, over the limit of "
                         f"{limits.max_frames}")
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{image.format} image is truncated or corrupt: {e}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, cfg: VisionConfig) -> np.ndarray:
    """A decoded image as the tower's input: [S, S, C] float32, resized and normalised."""
    s = cfg.image_size
    resized = to_rgb(image).resize((s, s), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, np.float32) * np.float32(1 / 255)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return (pixels - mean) / std


def load_image(data: bytes, cfg: VisionConfig, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """``preprocess(decode(data))``: encoded bytes -> [S, S, C] float32."""
    return preprocess(decode(data, limits), cfg)
