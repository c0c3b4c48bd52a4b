"""A small deterministic, checkpointable batch source for tests, benchmarks and smoke runs.

Batch ``i`` depends only on ``(seed, i)``, so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would. Each row packs documents of random length; a document is an
arithmetic progression modulo V with a random start and stride, so a model can learn it and the
loss falls.
"""

from __future__ import annotations

import numpy as np


class ToyBatches:
    """An endless iterator of packed batches with ``get_state()``/``set_state()``.

    Each batch is a dict of numpy arrays, all [B, T]: ``tokens`` and ``targets`` (int32; the
    target is the next token of the same document), ``loss_mask`` (float32; 0 on each document's
    last token, which has no next token), ``segment_ids`` (int32, from 1 per document) and
    ``positions`` (int32, restarting at 0 per document).
    """

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0,
                 docs_per_row: int = 2):
        if vocab_size < 2 or batch_size < 1 or seq_len < 2:
            raise ValueError(f"ToyBatches needs vocab_size >= 2, batch_size >= 1, seq_len >= 2; got "
                             f"{vocab_size}, {batch_size}, {seq_len}")
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.seed, self.docs_per_row = seed, max(1, min(docs_per_row, seq_len // 2))
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """The batch at ``index`` (a pure function of seed and index)."""
        b, t, v = self.batch_size, self.seq_len, self.vocab_size
        rng = np.random.default_rng([self.seed, index])
        # T+1 tokens per row so targets are the tokens shifted by one within each document.
        full = np.zeros((b, t + 1), np.int64)
        seg = np.zeros((b, t + 1), np.int32)
        pos = np.zeros((b, t + 1), np.int32)
        for row in range(b):
            cuts = np.sort(rng.choice(np.arange(2, t - 1), self.docs_per_row - 1, replace=False)) \
                if self.docs_per_row > 1 else np.array([], np.int64)
            bounds = [0, *cuts.tolist(), t + 1]
            for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                start, stride = rng.integers(0, v), rng.integers(1, max(2, min(v, 8)))
                n = np.arange(hi - lo)
                full[row, lo:hi] = (start + stride * n) % v
                seg[row, lo:hi] = d + 1
                pos[row, lo:hi] = n
        same_doc = seg[:, 1:] == seg[:, :-1]
        return {
            "tokens": full[:, :-1].astype(np.int32),
            "targets": full[:, 1:].astype(np.int32),
            "loss_mask": same_doc.astype(np.float32),
            "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
        }
