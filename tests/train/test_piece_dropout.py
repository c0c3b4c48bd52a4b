"""Piece dropout: finer cuts of the same text, numbers and special tokens kept, a batch still a
function of its step."""

import numpy as np
import pytest

from model.tokenizer import Tokenizer
from train.data import BatchBuilder, SyntheticDataConfig
from train.piece_dropout import PieceDropout

TEXT = ("<|im_start|>user\nCould you reserve the apartment for travellers 12 and budget 4315.5, "
        "money code CHF?<|im_end|>\n<|im_start|>assistant\n<think>\nThe user asks.\n</think>\n\n"
        '<tool_call>\n{"name": "reserve_apartment", "arguments": {"travellers": 12}}\n</tool_call>')


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load("checkpoints/kestrel-nano")


def test_dropout_keeps_the_text_numbers_and_special_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    dropout = PieceDropout(tokenizer, 0.5)
    keep = set(tokenizer.special_ids.values()) | {i for i in ids if any(c.isdigit() for c in tokenizer.decode([i]))}
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(20):
        out = dropout(ids, rng)
        assert tokenizer.decode(out) == TEXT
        assert [i for i in out if i in keep] == [i for i in ids if i in keep]
        # Every piece written is one the tokenizer itself makes of its own text.
        assert all(tokenizer.encode(tokenizer.decode([i])) == [i] for i in set(out) - set(ids))
        lengths.add(len(out))
    assert min(lengths) > len(ids) and len(lengths) > 3


def test_dropout_writes_pieces_the_plain_encoding_never_does(tokenizer):
    ids = tokenizer.encode(TEXT)
    rng = np.random.default_rng(1)
    seen = {i for _ in range(50) for i in PieceDropout(tokenizer, 0.2)(ids, rng)}
    assert len(seen - set(ids)) >= 20


def test_rate_zero_is_the_plain_encoding_and_bad_rates_are_refused(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert PieceDropout(tokenizer, 0.0)(ids, np.random.default_rng(0)) == ids
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="piece dropout rate"):
            PieceDropout(tokenizer, bad)
        with pytest.raises(ValueError, match="piece_dropout"):
            SyntheticDataConfig(tokenizer="checkpoints/kestrel-nano", piece_dropout=bad)


def test_a_batch_with_dropout_is_a_function_of_its_step():
    def batch(rate, step):
        cfg = SyntheticDataConfig(tokenizer="checkpoints/kestrel-nano", batch_size=2, seq_len=512, seed=3,
                                  piece_dropout=rate)
        return BatchBuilder(cfg)(step)

    a, b, plain = batch(0.1, 4), batch(0.1, 4), batch(0.0, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["tokens"], plain["tokens"])
    assert not np.array_equal(a["tokens"], batch(0.1, 5)["tokens"])
