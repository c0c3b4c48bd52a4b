"""Packing: examples never leak into each other, and the loss covers exactly the assistant's text."""

import numpy as np
import pytest

from model.tokenizer import Tokenizer
from train.nano_tokenizer import corpus
from train.packing import TokenizedExample, pack_batch, tokenize_segments
from train.synthetic import TASKS, mixture, render_kestrel

ALL = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_sentencepiece(corpus(200, seed=3), 700)


@pytest.fixture(scope="module")
def examples():
    return list(mixture(11, ALL, "train", 40))


def segments_of(batch, row):
    """{segment id: slice} of one row."""
    seg = batch["segment_ids"][row]
    return {int(s): np.flatnonzero(seg == s) for s in np.unique(seg) if s != 0}


def test_tokenized_mask_is_exactly_the_trainable_text(tok, examples):
    for ex in examples:
        segs = render_kestrel(ex)
        t = tokenize_segments(tok, segs)
        assert tok.decode(t.ids) == "".join(text for text, _ in segs)
        assert tok.decode(t.ids[t.trainable]) == "".join(text for text, tr in segs if tr)
        assert t.trainable.any() and not t.trainable.all()


def test_rows_hold_whole_examples_with_restarting_positions(tok, examples):
    toks = [tokenize_segments(tok, render_kestrel(ex)) for ex in examples]
    batch, stats = pack_batch(iter(toks), 3, 1536, pad_id=tok.pad_id)
    assert stats.examples == len(stats.placed) >= 3 and stats.fill > 0.6
    placed = [toks[k] for k in stats.placed]
    found = []
    for row in range(3):
        prev_end = -1
        for s, idx in sorted(segments_of(batch, row).items()):
            assert idx[0] == prev_end + 1 and np.all(np.diff(idx) == 1)  # contiguous, in order
            prev_end = idx[-1]
            np.testing.assert_array_equal(batch["positions"][row, idx], np.arange(len(idx)))
            ids = batch["tokens"][row, idx]
            # Targets are the next tokens of the same example; the last one has no loss.
            np.testing.assert_array_equal(batch["targets"][row, idx[:-1]], ids[1:])
            assert batch["loss_mask"][row, idx[-1]] == 0
            found.append(ids)
        pad = batch["segment_ids"][row] == 0
        assert np.all(batch["loss_mask"][row, pad] == 0)
        assert np.all(np.diff(batch["positions"][row, pad]) > 0)  # ascending, as attention assumes
    assert sorted(map(tuple, found)) == sorted(tuple(t.ids) for t in placed)


def test_loss_mask_decodes_to_each_examples_assistant_text(tok, examples):
    toks = [tokenize_segments(tok, render_kestrel(ex)) for ex in examples]
    batch, stats = pack_batch(iter(toks), 2, 2048, pad_id=tok.pad_id)
    want = sorted("".join(text for text, tr in render_kestrel(examples[k]) if tr) for k in stats.placed)
    got = []
    for row in range(2):
        for _, idx in segments_of(batch, row).items():
            m = batch["loss_mask"][row, idx] > 0
            # The first token of an example is never a target: it is a prompt token.
            got.append(tok.decode(batch["targets"][row, idx][m]))
    assert sorted(got) == want


def test_overlong_examples_are_skipped_not_truncated(tok):
    short = TokenizedExample(np.arange(5, dtype=np.int32), np.array([0, 0, 1, 1, 1], bool))
    long = TokenizedExample(np.arange(50, dtype=np.int32), np.ones(50, bool))
    batch, stats = pack_batch(iter([long, short, long, short]), 1, 12)
    assert stats.skipped == 2 and stats.placed == [1, 3]
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 5 + [0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0, :5], [0, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="longer than seq_len"):
        pack_batch(iter([long] * 10), 1, 12, max_skips=3)
    with pytest.raises(ValueError, match="batch_size"):
        pack_batch(iter([short]), 0, 12)


def test_every_task_fits_and_packs(tok):
    exs = [next(mixture(5, {3: 1}, "train", 1, tasks={name: 1.0})) for name in TASKS]
    toks = [tokenize_segments(tok, render_kestrel(ex)) for ex in exs]
    batch, stats = pack_batch(iter(toks), len(toks), 2048)
    assert stats.examples == len(TASKS) and stats.skipped == 0
    assert stats.loss_tokens == int(sum(t.trainable[1:].sum() for t in toks))
