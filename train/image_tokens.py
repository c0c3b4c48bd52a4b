"""Images in token sequences: each ``<image>`` marker is followed by a run of ``<|image_pad|>`` tokens.

The contract between the synthetic data (``train/synthetic/images.py``) and the model side (the
vision tower, built in ``model/``):

- an example carries ``images: list[bytes]`` (PNG), and its text one ``<image>`` per image, in order;
- tokenized, each ``<image>`` token (the image-start marker) is followed by ``n`` copies of
  ``<|image_pad|>``, where the tower's ``n`` soft tokens are spliced in; the run is one
  bidirectional span. This is the layout the serving side builds for prompts (Gemma 3's processor
  and vLLM lay prompts out the same way: marker, then the placeholders; Kestrel has no end marker),
  with ``n`` the model's ``vision.mm_tokens_per_image``;
- a packed batch adds ``image_span_ids`` (int32 [B, T]: ``m + 1`` on the pads of the batch's m-th
  image, 0 elsewhere) and ``images`` (list of the batch's PNG bytes, m-th at index m). Pads are never
  trained (they lie in the user turn; `expand_images` refuses a placeholder in trained text).

A model takes images when its config has a ``vision`` entry that is not None (`has_vision_tower`).
The names and numbers of that entry this module reads (``mm_tokens_per_image``, ``image_token_id``,
``image_start_id``) are read with ``getattr``, so text-only code never imports the tower.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kestrel.errors import KestrelError
from train.packing import TokenizedExample

IMAGE_TOKEN = "<image>"
IMAGE_PAD_TOKEN = "<|image_pad|>"


def image_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of ``<image>`` and ``<|image_pad|>`` in `tokenizer`.

    Raises:
      KestrelError: the vocabulary lacks either token.
    """
    ids = tokenizer.token_to_id(IMAGE_TOKEN), tokenizer.token_to_id(IMAGE_PAD_TOKEN)
    if None in ids:
        raise KestrelError(f"the tokenizer has no {IMAGE_TOKEN} or {IMAGE_PAD_TOKEN} token; image tasks need both")
    return ids  # type: ignore[return-value]


def expand_images(ex: TokenizedExample, images: list[bytes], placeholder_id: int, pad_id: int,
                  n: int) -> TokenizedExample:
    """Inserts `n` pad tokens after each image marker of `ex` and records where each run starts.

    Args:
      ex: a tokenized conversation whose ids hold one `placeholder_id` per image.
      images: the PNG bytes, in marker order.
      placeholder_id: the id of ``<image>``, the marker (kept).
      pad_id: the id of ``<|image_pad|>``.
      n: soft tokens per image (>= 1).

    Returns:
      The example with ``L + len(images) * n`` tokens, ``images`` and ``image_starts`` set.

    Raises:
      ValueError: the count of markers differs from the count of images, the text holds pad tokens
        of its own, or a marker is in trained text.
    """
    if n < 1:
        raise ValueError(f"image_tokens must be >= 1, got {n}")
    where = np.flatnonzero(ex.ids == placeholder_id)
    if len(where) != len(images):
        raise ValueError(f"the text holds {len(where)} {IMAGE_TOKEN} placeholders for {len(images)} images")
    if not len(where):
        return ex
    if (ex.ids == pad_id).any():
        raise ValueError(f"the text holds {IMAGE_PAD_TOKEN} tokens of its own")
    if ex.trainable[where].any():
        raise ValueError(f"an {IMAGE_TOKEN} placeholder lies in trained text")
    ids, flags, starts, prev = [], [], [], 0
    for k, at in enumerate(where):
        ids.append(ex.ids[prev:at + 1])  # up to and with the marker
        flags.append(ex.trainable[prev:at + 1])
        starts.append(int(at) + 1 + k * n)
        ids.append(np.full(n, pad_id, np.int32))
        flags.append(np.zeros(n, bool))
        prev = at + 1
    ids.append(ex.ids[prev:])
    flags.append(ex.trainable[prev:])
    return TokenizedExample(np.concatenate(ids).astype(np.int32), np.concatenate(flags),
                            images=tuple(images), image_starts=tuple(starts), image_len=n)


def has_vision_tower(model_or_config: Any) -> bool:
    """Whether a model (or its ``ModelConfig``) takes images: its config's ``vision`` is set."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision", None) is not None


def check_tokenizer_matches_tower(tokenizer, model_config: Any) -> None:
    """Checks that `tokenizer`'s image marker and pad ids are the ones `model_config`'s tower
    splices at.

    Raises:
      KestrelError: the ids differ, or the tokenizer lacks the image tokens.
    """
    vision = model_config.vision
    marker, pad = image_token_ids(tokenizer)
    want = (getattr(vision, "image_start_id", marker), getattr(vision, "image_token_id", pad))
    if (marker, pad) != want:
        raise KestrelError(f"the tokenizer's {IMAGE_TOKEN}/{IMAGE_PAD_TOKEN} ids {(marker, pad)} differ from the "
                           f"vision tower's image_start_id/image_token_id {want}")
