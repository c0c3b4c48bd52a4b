"""Images in a prompt: message parts -> decoded images, and each image's marker -> its token span.

A message's ``content`` may be a list of parts, ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": <encoded bytes>}`` (the API layer turns OpenAI ``image_url`` data
URLs, Responses ``input_image`` and gRPC ``InputImage`` into the latter). Each image part becomes
the text of the model's image-start token (Kestrel: ``<image>``; Gemma 3: ``<start_of_image>``)
so the chat template renders it where it stood; after tokenizing, every image-start token is
followed by ``mm_tokens_per_image`` placeholders (and the image-end token, if the model has one),
the span the tower's soft tokens replace, as Gemma 3's processor and vLLM lay prompts out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from model.image_processing import ImageError, ImageLimits, content_hash, load_image
from model.vision_config import VisionConfig
from serve.request import MultiModalSpan


@dataclasses.dataclass(frozen=True)
class PromptImage:
    """One decoded image of a request: its content hash and the tower's input [S, S, C]."""

    content_hash: str
    pixels: np.ndarray


def split_image_parts(messages: Sequence[Mapping[str, Any]], marker: str | None
                      ) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Messages with list contents flattened to text (images replaced by ``marker``), and the
    images' bytes in order.

    Raises:
      ValueError: a part of an unknown type, or an image where there is no marker (the model has
        no vision tower).
    """
    out, images = [], []
    for i, m in enumerate(messages):
        m = dict(m)
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image":
                    if marker is None:
                        raise ValueError(f"messages[{i}].content[{j}]: this model does not take images")
                    if m.get("role") != "user":
                        raise ValueError(f"messages[{i}].content[{j}]: images are allowed in user messages only")
                    data = part.get("image")
                    if not isinstance(data, (bytes, bytearray)):
                        raise ValueError(f"messages[{i}].content[{j}].image must be the image's bytes")
                    texts.append(marker)
                    images.append(bytes(data))
                else:
                    raise ValueError(f"messages[{i}].content[{j}] has unknown type {kind!r} (text or image)")
            m["content"] = "".join(texts)
        out.append(m)
    return out, images


def decode_images(images: Sequence[bytes], cfg: VisionConfig, limits: ImageLimits,
                  max_images: int) -> list[PromptImage]:
    """Decodes and preprocesses a request's images, each checked against the limits.

    Raises:
      ValueError: more than ``max_images`` images, or an image that fails to decode (the message
        names which one and why).
    """
    if len(images) > max_images:
        raise ValueError(f"the request has {len(images)} images; the limit is {max_images} per request")
    out = []
    for i, data in enumerate(images):
        try:
            out.append(PromptImage(content_hash(data), load_image(data, cfg, limits)))
        except ImageError as e:
            raise ValueError(f"image {i}: {e}") from None
    return out


def expand_images(ids: Sequence[int], images: Sequence[PromptImage], cfg: VisionConfig, *,
                  offset: int = 0) -> tuple[tuple[int, ...], tuple[MultiModalSpan, ...]]:
    """Inserts each image's placeholder span after its image-start token.

    Args:
      ids: tokens holding one ``cfg.image_start_id`` per image, in order.
      images: the images, in order.
      cfg: the model's vision config.
      offset: where ``ids`` start in the full prompt (the spans' offsets count from there).

    Returns:
      (tokens with the spans inserted, one MultiModalSpan per image).

    Raises:
      ValueError: the number of image-start tokens differs from the number of images (e.g. the
        text itself spells the marker), or the text holds placeholder tokens of its own.
    """
    start, pad, end = cfg.image_start_id, cfg.image_token_id, cfg.image_end_id
    markers = sum(1 for t in ids if t == start)
    if markers != len(images):
        raise ValueError(f"the prompt has {markers} image markers for {len(images)} images; text may "
                         "not contain the image marker token itself")
    if pad in ids:
        raise ValueError("the prompt text contains the image placeholder token itself")
    out: list[int] = []
    spans = []
    n = cfg.mm_tokens_per_image
    it = iter(images)
    for t in ids:
        out.append(t)
        if t == start:
            image = next(it)
            spans.append(MultiModalSpan(offset + len(out), n, image.content_hash))
            out.extend([pad] * n)
            if end is not None:
                out.append(end)
    return tuple(out), tuple(spans)
