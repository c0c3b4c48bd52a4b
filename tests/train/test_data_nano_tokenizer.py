"""kestrel-nano's tokenizer trained on generated text: chat tokens are single ids, text round-trips."""

import pytest

from model.tokenizer import Tokenizer
from model.tokenizer_backends import CHAT_SPECIAL_TOKENS
from train.nano_tokenizer import corpus, main, train_nano_tokenizer
from train.synthetic import mixture, render_kestrel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("nano_tok")
    tok = train_nano_tokenizer(path, vocab_size=2000, n_examples=200, seed=1)
    return tok, path


def test_corpus_is_deterministic_rendered_chat():
    a, b = list(corpus(5, seed=2)), list(corpus(5, seed=2))
    assert a == b and a != list(corpus(5, seed=3))
    assert all(t.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n<think>" in t for t in a)


def test_special_tokens_are_single_ids(saved):
    tok, _ = saved
    for t in CHAT_SPECIAL_TOKENS + ("<s>", "</s>", "<pad>"):
        ids = tok.encode(t)
        assert len(ids) == 1 and tok.decode(ids) == t, t
    assert len(set(tok.special_ids.values())) == len(tok.special_ids)
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids


def test_round_trip_and_reload(saved):
    tok, path = saved
    texts = ["".join(s for s, _ in render_kestrel(ex)) for ex in mixture(99, {4: 1, 5: 1}, "heldout", 10)]
    texts += ["Ünïcödé ✓ 中文 emoji 🦅 and\ttabs  double  spaces\n\n", "x = 12345.678e-9"]
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size <= 2000
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and loaded.encode(text) == ids
    # Trained on the generator's text, it compresses it well (bytes per token).
    assert sum(len(t.encode()) for t in texts[:10]) / sum(len(tok.encode(t)) for t in texts[:10]) > 2.5
    prompt = loaded.render_chat([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n")


def test_numbers_are_three_digit_chunks_wherever_they_appear(saved):
    tok, _ = saved
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text)]  # noqa: E731
    assert pieces("5285656") == ["528", "565", "6"]
    for text in ('{"expression": "(5285656 * 2) + 0.009"}', "Answer: $5285656", "x = 5285656."):
        assert ["528", "565", "6"] == [p for p in pieces(text) if p.isdigit()][:3], text
    assert pieces("0.009") == ["0", ".", "009"]


def test_cli_writes_a_tokenizer(tmp_path, capsys):
    main([str(tmp_path / "t"), "--vocab-size", "1600", "--examples", "50"])
    assert "ids" in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "t").vocab_size <= 1600
    main([str(tmp_path / "d"), "--vocab-size", "400", "--examples", "50", "--no-number-chunks"])
    digits = Tokenizer.load(tmp_path / "d")
    assert [digits.decode([i]) for i in digits.encode("2026")] == ["2", "0", "2", "6"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_nano_tokenizer(vocab_size=100, n_examples=10)


def test_cli_cuts_letters_alone_in_an_existing_tokenizer_keeping_its_ids(saved, tmp_path):
    tok, path = saved
    assert tok.encode(" k") == [tok.token_to_id("\u2581k")]  # one piece before the edit
    main([str(tmp_path / "out"), "--from", str(path), "--letters-alone"])
    out = Tokenizer.load(tmp_path / "out")
    assert out.vocab_size == tok.vocab_size and out.eos_token == tok.eos_token
    assert out.render_chat([{"role": "user", "content": "hi"}]) == tok.render_chat([{"role": "user", "content": "hi"}])
    k = out.token_to_id("k")
    assert k in out.encode("Solve for k: 9k = 18.") and out.encode(" k") == [out.token_to_id("\u2581"), k]
    with pytest.raises(SystemExit):  # --from without an edit to make
        main([str(tmp_path / "again"), "--from", str(path)])
    with pytest.raises(SystemExit):  # an option of training a tokenizer, which --from does not do
        main([str(tmp_path / "again"), "--from", str(path), "--letters-alone", "--vocab-size", "4000"])
