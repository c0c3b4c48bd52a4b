"""A model whose embedding has more rows than its tokenizer has ids (kestrel-nano: 8,604 pieces,
8,768 rows; a padding of more than one 32-bit word): grammar masks fill the tokenizer's words,
never allow a padding row, and equal the masks of the unpadded vocabulary."""

import llguidance
import numpy as np

from model.checkpoint import load_tokenizer
from serve.grammar import ChannelVocab, response_format_grammar

NANO = "checkpoints/kestrel-nano"


def vocabs():
    tok = load_tokenizer(NANO)
    n = len(tok.token_bytes())
    make = lambda size: ChannelVocab.from_token_bytes(  # noqa: E731
        tok.token_bytes(), tok.special_ids, tok.encode, vocab_size=size, eos_ids=sorted(tok.stop_ids))
    return make(n), make(32 * ((n + 31) // 32) + 160)


def test_masks_of_a_padded_vocabulary_equal_the_unpadded_ones():
    plain, padded = vocabs()
    assert padded.n_words > padded.ll_words == plain.n_words
    grammar = response_format_grammar({"type": "object", "properties": {"n": {"type": "integer"}},
                                       "required": ["n"]})
    one = np.full(padded.n_words, -1, np.int32)
    padded.fill_mask(padded.new_matcher(grammar), one)
    rows = np.full((3, padded.n_words), -1, np.int32)
    padded.fill_masks(llguidance.LLExecutor(), [(padded.new_matcher(grammar), 0),
                                                (padded.new_matcher(grammar), 2)], rows)
    expected = np.zeros(plain.n_words, np.int32)
    plain.fill_mask(plain.new_matcher(grammar), expected)
    assert expected.any()
    for mask in (one, rows[0], rows[2]):
        np.testing.assert_array_equal(mask[:plain.n_words], expected)
        assert not mask[plain.n_words:].any()  # padding rows are never allowed
    assert (rows[1] == -1).all()  # a row no matcher names is left alone
