"""A training batch's images on their way to the jitted step: decoded, preprocessed and padded on
the host to one fixed shape, so that the step compiles once whatever a batch holds.

A batch from a mix with image tasks (``train/image_tokens.py``) carries ``images`` (PNG bytes, the
m-th named by span id ``m + 1`` in ``image_span_ids``). The step receives instead:

- ``pixels``: float32 [I, S, S, C], the batch's images preprocessed by ``model/image_processing.py``
  (Pillow, the tower's resolution and normalisation) followed by zero images up to I = max_images;
- ``image_count``: int32 [], how many of the I are real (the step zeroes the soft tokens of the rest);
- ``image_span_ids``: int32 [B, T], unchanged.
"""

from __future__ import annotations

import numpy as np

from model.image_processing import ImageError, load_image
from model.vision_config import VisionConfig

def default_max_images(batch_size: int, seq_len: int, mm_tokens_per_image: int) -> int:
    """The most images a [B, T] batch can hold: each takes its marker and M pads."""
    return max(1, batch_size * (seq_len // (mm_tokens_per_image + 1)))


def image_inputs(batch: dict, vision: VisionConfig, max_images: int) -> dict[str, np.ndarray]:
    """``pixels``, ``image_count`` and ``image_span_ids`` of a batch that carries ``images``.

    Raises:
      ValueError: more images than ``max_images``, a span id naming no image, a span whose length
        is not the tower's ``mm_tokens_per_image``, or an image that does not decode.
    """
    images = list(batch["images"])
    spans = np.asarray(batch.get("image_span_ids"))
    if spans.ndim != 2:
        raise ValueError("a batch with images needs image_span_ids [B, T]")
    if len(images) > max_images:
        raise ValueError(f"the batch carries {len(images)} images, over data.max_images={max_images}; "
                         "raise data.max_images")
    counts = np.bincount(spans.reshape(-1), minlength=len(images) + 1)
    if len(counts) > len(images) + 1:
        raise ValueError(f"image_span_ids name image {len(counts) - 1} but the batch carries "
                         f"{len(images)} images")
    m = vision.mm_tokens_per_image
    wrong = [k for k in range(1, len(images) + 1) if counts[k] != m]
    if wrong:
        raise ValueError(f"image spans {wrong} do not hold the tower's {m} soft tokens each "
                         f"(lengths {[int(counts[k]) for k in wrong]})")
    s, c = vision.image_size, vision.num_channels
    pixels = np.zeros((max_images, s, s, c), np.float32)  # [I, S, S, C]
    for k, png in enumerate(images):
        try:
            pixels[k] = load_image(png, vision)
        except ImageError as e:
            raise ValueError(f"image {k} of the batch: {e}") from e
    return {"pixels": pixels, "image_count": np.int32(len(images)),
            "image_span_ids": spans.astype(np.int32)}
