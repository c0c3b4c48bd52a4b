"""Tokenizing rendered conversations and packing several of them into one [B, T] batch.

An example becomes ids ``e[0..L-1]`` and a per-token ``trainable`` flag (True exactly on the
tokens of ``render_kestrel``'s trainable segments). Placed at offset ``o`` of a row it fills
``tokens[o:o+L] = e``, ``targets[o:o+L-1] = e[1:]``, ``loss_mask[o:o+L-1] = trainable[1:]``,
``positions[o:o+L] = 0..L-1`` and ``segment_ids[o:o+L] = k`` (k = 1, 2, ... within the row). Its
last token has no next token inside the example, so its loss is masked: a target never crosses
an example boundary. Unused space is padding: segment 0, loss mask 0, each position its index in
the row, so positions ascend along every segment, padding too (the model's attention relies on
that to skip the keys after each query; see ``model/transformer.py``).

Rows are filled first-fit from a stream of examples; an example too long for a row is skipped
(counted in `PackStats`), never truncated, so a trained answer is never cut off.

An example with images (``train/image_tokens.py``) also writes ``image_span_ids[row, o+s:o+s+n]
= m + 1`` for each image run starting at ``s``, and appends its PNG bytes to ``images`` at index m,
when the batch carries images (``pack_batch(..., with_images=True)``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Protocol

import numpy as np


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One conversation as token ids with its loss flags.

    Attributes:
      ids: int32 [L] token ids.
      trainable: bool [L]; True on tokens the model should learn to produce.
      images: PNG bytes of the example's images, in order.
      image_starts: where each image's run of pad tokens starts in `ids`.
      image_len: the length of every run (the soft tokens per image).
    """

    ids: np.ndarray
    trainable: np.ndarray
    images: tuple[bytes, ...] = ()
    image_starts: tuple[int, ...] = ()
    image_len: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class PackStats:
    """What one packed batch holds.

    Attributes:
      examples: examples placed.
      skipped: examples longer than a row, dropped.
      tokens: non-padding tokens.
      loss_tokens: tokens with loss_mask 1.
      fill: tokens / (B * T).
      placed: the stream positions (0-based, counting every example consumed) of the examples
        placed, in order.
    """

    examples: int = 0
    skipped: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    fill: float = 0.0
    placed: list[int] = dataclasses.field(default_factory=list)


def tokenize_segments(tokenizer: _Encoder, segments: Iterable[tuple[str, bool]]) -> TokenizedExample:
    """Encodes ``(text, trainable)`` segments one by one and concatenates them.

    Encoding each segment on its own puts a token boundary at every segment boundary, exactly as
    at inference time, where the prompt (ending in ``<|im_start|>assistant\\n``) is encoded
    before the model writes the rest.

    Args:
      tokenizer: anything with ``encode(text) -> list[int]`` (no BOS added).
      segments: ``render_kestrel``'s output.

    Returns:
      The example's ids [L] and trainable flags [L].
    """
    ids: list[int] = []
    flags: list[bool] = []
    for text, trainable in segments:
        piece = tokenizer.encode(text)
        ids.extend(piece)
        flags.extend([bool(trainable)] * len(piece))
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(flags, bool))


def empty_batch(batch_size: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """An all-padding batch: the arrays every packed batch starts from."""
    return {
        "tokens": np.full((batch_size, seq_len), pad_id, np.int32),
        "targets": np.full((batch_size, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((batch_size, seq_len), np.float32),
        "segment_ids": np.zeros((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
    }


def place(batch: dict[str, np.ndarray], row: int, offset: int, segment: int, ex: TokenizedExample) -> None:
    """Writes `ex` into ``batch`` at ``[row, offset:offset+len(ex)]`` as segment `segment`."""
    n = len(ex)
    sl = slice(offset, offset + n)
    batch["tokens"][row, sl] = ex.ids
    batch["targets"][row, offset:offset + n - 1] = ex.ids[1:]
    batch["loss_mask"][row, offset:offset + n - 1] = ex.trainable[1:]
    batch["segment_ids"][row, sl] = segment
    batch["positions"][row, sl] = np.arange(n, dtype=np.int32)
    if ex.images:
        if "images" not in batch:
            raise ValueError("an example with images went into a batch that does not carry them "
                             "(pack_batch(..., with_images=True))")
        for png, start in zip(ex.images, ex.image_starts):
            batch["images"].append(png)
            batch["image_span_ids"][row, offset + start:offset + start + ex.image_len] = len(batch["images"])


def pack_batch(examples: Iterator[TokenizedExample], batch_size: int, seq_len: int, *,
               pad_id: int = 0, max_misses: int = 16, max_skips: int = 256,
               with_images: bool = False) -> tuple[dict[str, np.ndarray], PackStats]:
    """Fills a [B, T] batch first-fit from `examples`.

    Each example goes into the first row with room for it. Packing stops after `max_misses`
    consecutive examples fit no row (they are dropped, like the unused tail of the stream), when
    every row is full, or when the stream ends.

    Args:
      examples: an iterator of tokenized examples (consumed as far as needed).
      batch_size: B.
      seq_len: T.
      pad_id: the id written in padding.
      max_misses: consecutive non-fitting examples that end the batch.
      max_skips: examples longer than T allowed in one batch before giving up.
      with_images: add ``image_span_ids`` (int32 [B, T]) and ``images`` (list of PNG bytes).

    Returns:
      The batch (``tokens``, ``targets``, ``segment_ids``, ``positions`` int32 [B, T] and
      ``loss_mask`` float32 [B, T], plus the image entries) and its `PackStats`.

    Raises:
      ValueError: bad sizes, or more than `max_skips` examples longer than ``seq_len``.
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"pack_batch needs batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    batch = empty_batch(batch_size, seq_len, pad_id)
    if with_images:
        batch["image_span_ids"] = np.zeros((batch_size, seq_len), np.int32)
        batch["images"] = []
    used = [0] * batch_size
    segments = [0] * batch_size
    stats = PackStats()
    misses = 0
    for k, ex in enumerate(examples):
        n = len(ex)
        if n > seq_len:
            stats.skipped += 1
            if stats.skipped > max_skips:
                raise ValueError(f"more than {max_skips} examples are longer than seq_len={seq_len}; "
                                 f"raise seq_len (this one has {n} tokens)")
            continue
        if n < 2:
            continue  # nothing to predict
        row = next((r for r in range(batch_size) if seq_len - used[r] >= n), None)
        if row is None:
            misses += 1
            if misses >= max_misses:
                break
            continue
        misses = 0
        segments[row] += 1
        place(batch, row, used[row], segments[row], ex)
        used[row] += n
        stats.examples += 1
        stats.placed.append(k)
        if min(used) >= seq_len:
            break
    stats.tokens = int(sum(used))
    stats.loss_tokens = int(batch["loss_mask"].sum())
    stats.fill = stats.tokens / (batch_size * seq_len)
    return batch, stats
