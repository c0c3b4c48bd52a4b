"""Piece dropout: training text cut, now and then, into smaller pieces of the same vocabulary.

A BPE vocabulary holds many pieces that its own encoding of the training text almost never
produces: the intermediate merges inside longer words (``"expres"`` inside ``"expression"``), and
the pieces of words the text only has in another form (``"▁money"`` in a question, never
``"money"`` in a call). The model never writes them, so their output embeddings never learn to be
chosen, and an unseen word that the tokenizer cuts into them (a held-out function name) comes out
garbled even where copying works. BPE-dropout (Provilkov et al., 2020) trains on random finer
segmentations of the same text so that every piece is written now and then.

This is that idea on a finished encoding: each piece is, with probability `rate`, replaced by a
random pair of vocabulary pieces that spell it (``"▁money" -> "▁m" "oney"``), and each half may
be split again. Only ordinary pieces take part: not special tokens, byte fallbacks, or pieces with
digits (numbers keep their three-digit chunks, the copying the model relies on), and only pieces
the tokenizer itself produces for their own text (sentencepiece's unused pieces never come out).
The text is unchanged: decoding the result gives back the same string. We split finished
encodings instead of calling sentencepiece's own sampling (``enable_sampling``) because its random
generator is per-thread process state: a batch must be a pure function of its step for resume.
"""

from __future__ import annotations

import numpy as np


class PieceDropout:
    """Splits pieces of an encoding at random (see the module text).

    Args:
      tokenizer: a ``model.tokenizer.Tokenizer``.
      rate: the probability that a piece (and then each of its halves) is split; 0 splits nothing.

    Raises:
      ValueError: `rate` outside [0, 1).
    """

    def __init__(self, tokenizer, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"piece dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.splits: dict[int, tuple[tuple[int, int], ...]] = self._splits(tokenizer) if rate > 0 else {}

    @staticmethod
    def _splits(tokenizer) -> dict[int, tuple[tuple[int, int], ...]]:
        """Piece id -> every (left, right) pair of ordinary pieces whose texts join to its text."""
        special = set(tokenizer.special_ids.values())
        texts = [b.decode("utf-8", "replace") for b in tokenizer.token_bytes()]
        ordinary: dict[str, int] = {}
        for i, text in enumerate(texts):
            if (i in special or not text or "\ufffd" in text or any(c.isdigit() for c in text)
                    or tokenizer.encode(text) != [i]):
                continue
            ordinary.setdefault(text, i)
        out = {}
        for text, i in ordinary.items():
            pairs = tuple((ordinary[text[:k]], ordinary[text[k:]]) for k in range(1, len(text))
                          if text[:k] in ordinary and text[k:] in ordinary)
            if pairs:
                out[i] = pairs
        return out

    def __call__(self, ids: list[int], rng: np.random.Generator) -> list[int]:
        """`ids` with pieces split at random; the same text."""
        if not self.splits:
            return list(ids)
        out: list[int] = []
        stack = list(reversed(ids))
        while stack:
            t = stack.pop()
            pairs = self.splits.get(t)
            if pairs and rng.random() < self.rate:
                left, right = pairs[int(rng.integers(len(pairs)))]
                stack += (right, left)
            else:
                out.append(t)
        return out


class DroppingEncoder:
    """``encode(text)`` through `tokenizer`, then `dropout` with `rng`: what ``tokenize_segments``
    takes in place of a tokenizer."""

    def __init__(self, tokenizer, dropout: PieceDropout, rng: np.random.Generator):
        self.tokenizer, self.dropout, self.rng = tokenizer, dropout, rng

    def encode(self, text: str) -> list[int]:
        return self.dropout(self.tokenizer.encode(text), self.rng)
