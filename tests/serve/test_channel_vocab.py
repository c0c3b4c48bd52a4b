"""ChannelVocab on a tiny byte-level BPE trained offline here; also the builder the other channel
and grammar tests import (``tiny_vocab``) and their stand-in sampler (``sample_allowed``)."""

import functools
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from serve.grammar import CHANNEL_TAGS, IM_END, ChannelVocab, has_bit, unpack_mask

SPECIALS = ["<|endoftext|>", "<|im_start|>", *CHANNEL_TAGS]
CORPUS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "units": "metric"}}',
    "Let me think about this step by step. The answer is 42, because 6 * 7 = 42.",
    "Considering the limited time by the user, I have to give the solution based on the "
    "thinking directly now.\n\n",
    "héllo ünïcode 日本語 🙂 Straße naïve café",
    '[1, 2.5, -3e10, true, false, null] {"a": [], "b": {}}',
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json() -> str:
    """A ~600-token byte-level BPE with the chat tags as special tokens (every byte is a token,
    so any text is encodable and multi-byte characters can split across tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def tiny_vocab(pad_to: int | None = None) -> ChannelVocab:
    eos = json.loads(tiny_tokenizer_json())["added_tokens"][0]["id"]  # <|endoftext|>
    return ChannelVocab.from_tokenizer_json(tiny_tokenizer_json(), vocab_size=pad_to, eos_ids=[eos])


def sample_allowed(mask: np.ndarray, vocab: ChannelVocab, rng: np.random.Generator,
                   prefer=None) -> int:
    """Stand-in sampler: a uniform draw among the allowed tokens, or among ``prefer`` (a [V]
    bool) where that leaves any."""
    allowed = unpack_mask(mask, vocab.vocab_size)
    assert allowed.any(), "empty mask"
    if prefer is not None and (allowed & prefer).any():
        allowed = allowed & prefer
    return int(rng.choice(np.flatnonzero(allowed)))


def test_tags_are_found_and_special():
    v = tiny_vocab()
    assert set(v.tag_ids) == set(CHANNEL_TAGS)
    for t in CHANNEL_TAGS:
        assert v.special[v.tag_ids[t]]
        assert not has_bit(v.text_mask, v.tag_ids[t])
    assert v.tag_ids[IM_END] in v.eos_ids and len(v.eos_ids) == 2
    assert v.ll_tokenizer.eos_token == v.tag_ids[IM_END]


def test_masks_match_token_bytes():
    v = tiny_vocab()
    text = unpack_mask(v.text_mask, v.vocab_size)
    blank = unpack_mask(v.blank_mask, v.vocab_size)
    for i in range(v.vocab_size):
        b = v.token_bytes(i)
        assert text[i] == (not v.special[i])
        assert blank[i] == (text[i] and b != b"" and b.strip() == b"" and set(b) <= set(b" \t\r\n"))
    assert blank.sum() >= 2  # at least "\n" and " "


def test_padded_vocab_never_allows_padding_rows():
    v = tiny_vocab(pad_to=640)
    assert v.vocab_size == 640 and v.n_words == 20
    n = Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size()
    assert n < 640
    text = unpack_mask(v.text_mask, 640)
    assert not text[n:].any() and text[:n].sum() >= 256 - 1  # every byte but 0xFF (see below)


def test_pack_unpack_roundtrip():
    v = tiny_vocab()
    rng = np.random.default_rng(0)
    b = rng.random(v.vocab_size) < 0.3
    np.testing.assert_array_equal(unpack_mask(v.pack(b), v.vocab_size), b)
    ids = [0, 31, 32, 63, v.vocab_size - 1]
    np.testing.assert_array_equal(np.flatnonzero(unpack_mask(v.mask_of(ids), v.vocab_size)), ids)


def test_encode_parses_tags_and_decoder_is_utf8_safe():
    v = tiny_vocab()
    ids = v.encode("hi</think>\n\n")
    assert v.tag_ids["</think>"] in ids
    # "日" is 3 bytes; feed it as single-byte tokens: nothing comes out until it is whole.
    byte_ids = [v.encode(bytes([c]).decode("latin-1"))[0] for c in b"x"]  # plain ascii id
    assert v.token_bytes(byte_ids[0]) == b"x"
    one_byte = {v.token_bytes(i): i for i in range(v.vocab_size) if len(v.token_bytes(i)) == 1}
    d = v.stream_decoder()
    pieces = [d.push(one_byte[bytes([c])]) for c in "日x".encode()]
    assert pieces == ["", "", "日", "x"]
    d2 = v.stream_decoder()
    assert d2.push(one_byte[b"\xe6"]) == "" and d2.flush() == "\ufffd"


def test_unrepresentable_byte_token_is_never_allowed():
    # llguidance reserves byte 0xFF (never in UTF-8) as its special-token marker; the byte-level
    # token for it decodes to nothing and must stay out of every mask.
    v = tiny_vocab()
    ff = [i for i in range(v.vocab_size) if Tokenizer.from_str(tiny_tokenizer_json()).id_to_token(i) == "ÿ"]
    assert len(ff) == 1 and v.special[ff[0]] and not has_bit(v.text_mask, ff[0])


def test_from_token_bytes_matches_tokenizer_json():
    from tokenizers import Tokenizer as HF
    hf = HF.from_str(tiny_tokenizer_json())
    ref = tiny_vocab()
    tokens = [hf.id_to_token(i).encode() if hf.id_to_token(i) in SPECIALS else ref.token_bytes(i)
              for i in range(ref.vocab_size)]
    special = {t: hf.token_to_id(t) for t in SPECIALS}
    v = ChannelVocab.from_token_bytes(tokens, special, lambda s: hf.encode(s, add_special_tokens=False).ids)
    np.testing.assert_array_equal(v.text_mask, ref.text_mask)
    np.testing.assert_array_equal(v.blank_mask, ref.blank_mask)
    assert v.tag_ids == ref.tag_ids


def test_missing_im_end_is_refused():
    with pytest.raises(ValueError, match="im_end"):
        ChannelVocab.from_tokenizer_json(Tokenizer(models.BPE()).to_str())
