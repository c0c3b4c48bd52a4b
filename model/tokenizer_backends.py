"""The two tokenizer engines behind ``model.tokenizer.Tokenizer``: HF ``tokenizers`` and sentencepiece.

Both answer the same small set of calls (encode without BOS, decode, id <-> token, save), so the
``Tokenizer`` above them has no per-format branches.
"""

from __future__ import annotations

import io
import json
import os
import re
import string
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2
import tokenizers
from tokenizers import AddedToken

from kestrel.errors import KestrelError
from model.gguf_tokenizer import bytes_to_unicode

# The chat-format tokens of DESIGN.md. Each must stay one token wherever a vocabulary has it.
CHAT_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<image>",
    "<|image_pad|>",
)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token


class HFBackend:
    """A ``tokenizers.Tokenizer`` (a ``tokenizer.json``).

    Args:
      tok: the tokenizer; BOS/EOS are added by ``Tokenizer``, not by its post-processor.
    """

    file_name = "tokenizer.json"

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0

    @classmethod
    def from_file(cls, path: Path) -> HFBackend:
        try:
            return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise KestrelError(f"cannot read tokenizer file {os.fspath(path)!r}: {e}") from e

    def ensure_added(self, tokens: list[str], special: bool) -> None:
        """Makes tokens the vocabulary already holds match whole in text, as transformers does."""
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        missing = [AddedToken(t, normalized=False, special=special) for t in tokens
                   if t not in added and self.tok.token_to_id(t) is not None]
        if missing:
            self.tok.add_tokens(missing)

    def special_tokens(self) -> list[str]:
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]

    def added_tokens(self) -> list[str]:
        return [t.content for t in self.tok.get_added_tokens_decoder().values()]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def post_processor_adds(self, token_id: int) -> bool:
        """Whether this tokenizer.json's post-processor starts every sequence with ``token_id``."""
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == token_id and ids != self.encode("a")

    def token_bytes(self) -> list[bytes]:
        """The bytes of every id: byte-level tokens un-mapped, ``<0xXX>`` byte-fallback tokens as
        that byte, ``▁`` as a space, added tokens as their text, and ``b""`` for unused ids."""
        decoder = json.dumps(json.loads(self.tok.to_str()).get("decoder"))
        byte_level = '"ByteLevel"' in decoder
        unmap = {c: b for b, c in bytes_to_unicode().items()}
        added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        out = []
        for i in range(self.vocab_size):
            token = self.tok.id_to_token(i)
            if token is None:
                out.append(b"")
            elif i in added:
                out.append(token.encode())
            elif byte_level and all(c in unmap for c in token):
                out.append(bytes(unmap[c] for c in token))
            elif _BYTE_PIECE.fullmatch(token):
                out.append(bytes([int(token[3:5], 16)]))
            else:
                out.append(token.replace("\u2581", " ").encode())
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.tok.id_to_token(index)

    def save(self, directory: Path) -> None:
        self.tok.save(os.fspath(directory / self.file_name))


class SentencePieceBackend:
    """A sentencepiece model (a ``tokenizer.model``).

    Sentencepiece matches user-defined symbols in text but not control symbols (``<s>``, ``</s>``,
    ``<pad>``), and drops control symbols on decode; we split both around them so that every
    special-token string maps to its one id and back.

    Args:
      proto: the serialized ``ModelProto``.
    """

    file_name = "tokenizer.model"

    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._control = {p: i for i, p in enumerate(pieces) if self.sp.is_control(i)}
        # Chat markers, which sentencepiece holds as user-defined symbols (matched whole in text).
        self._user = {
            p for p in pieces
            if p not in self._control and (p in CHAT_SPECIAL_TOKENS or (p.startswith("<|") and p.endswith("|>")))
        }
        self._split = (
            re.compile("(" + "|".join(re.escape(p) for p in sorted(self._control, key=len, reverse=True)) + ")")
            if self._control else None
        )

    @classmethod
    def from_file(cls, path: Path) -> SentencePieceBackend:
        data = Path(path).read_bytes()
        try:
            return cls(data)
        except RuntimeError as e:  # sentencepiece's parse error
            raise KestrelError(f"cannot read sentencepiece model {os.fspath(path)!r}: {e}") from e

    def ensure_added(self, tokens: list[str], special: bool) -> None:
        del tokens, special  # sentencepiece matches user-defined symbols itself; control ones in encode()

    def special_tokens(self) -> list[str]:
        """Control symbols, plus ``<|...|>`` markers (special in Qwen's vocabularies too)."""
        return sorted(self._control) + sorted(p for p in self._user if p.startswith("<|"))

    def added_tokens(self) -> list[str]:
        return sorted(self._control) + sorted(self._user)

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text, out_type=int)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._control:
                ids.append(self._control[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        skip = set(self.special_tokens()) if skip_special_tokens else set()
        out, run = [], []
        for i in ids:
            piece = self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None
            if piece is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if piece in self._control or piece in skip:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if piece not in skip:
                    out.append(piece)
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def post_processor_adds(self, token_id: int) -> bool:
        del token_id
        return False

    def token_bytes(self) -> list[bytes]:
        """The bytes of every id (see ``HFBackend.token_bytes``); control symbols as their text."""
        out = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i) or piece in self._user:
                out.append(piece.encode())
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for an unknown piece.
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, index: int) -> str | None:
        return self.sp.id_to_piece(index) if 0 <= index < self.vocab_size else None

    def save(self, directory: Path) -> None:
        (directory / self.file_name).write_bytes(self.proto)


# A space followed by a single ASCII letter ("▁k"): unused by `without_spaced_letters`.
SPACED_LETTERS = frozenset("\u2581" + c for c in string.ascii_letters)


def without_spaced_letters(proto: bytes) -> bytes:
    """The sentencepiece model `proto` with its space-prefixed single letters ("▁k") unused.

    Sentencepiece writes a lone letter after a space as one piece ("▁k") and the same letter
    glued to a number or at a line's start as another ("k" in "9k"), so a variable copied from
    an equation into a sentence is a different token: one a model can only map for the letters it
    was trained on. Unused, " k" is "▁" "k", the same "k" wherever it stands. The pieces stay in
    the vocabulary, marked unused (sentencepiece then never produces them and re-cuts whatever
    they would have merged), so every other id keeps its number and an embedding table sized for
    the old model still fits. Words are untouched ("▁kg" stays one piece); only a word cut into
    rarer pieces ("▁s" "ky" -> "▁" "s" "ky") gains a token.
    """
    model = sp_model_pb2.ModelProto()
    model.ParseFromString(proto)
    for piece in model.pieces:
        if piece.piece in SPACED_LETTERS and piece.type == sp_model_pb2.ModelProto.SentencePiece.NORMAL:
            piece.type = sp_model_pb2.ModelProto.SentencePiece.UNUSED
    return model.SerializeToString()


# Every digit string of one to three digits ("7", "07", "007", ..., "999"): with these as symbols a
# number is cut left to right into three-digit chunks ("5285656" -> "528" "565" "6") the same way
# wherever it appears, so copying a number is copying a few distinctive tokens.
NUMBER_CHUNKS = tuple(f"{n:0{w}d}" for w in (1, 2, 3) for n in range(10 ** w))


def train_sentencepiece_proto(lines, vocab_size: int, *, number_chunks: bool = False,
                              separate_spaces: bool = False, letters_alone: bool = False) -> bytes:
    """Trains Kestrel's own tokenizer: BPE with byte fallback and the chat tokens as symbols.

    Identity normalization and no whitespace folding or dummy prefix, so that decode(encode(text))
    is exactly ``text`` for any unicode input.

    Args:
      lines: an iterable of training strings.
      vocab_size: the target vocabulary size (an upper bound for a small corpus).
      number_chunks: numbers become three-digit chunks (`NUMBER_CHUNKS` as symbols, matched
        longest first from the left) instead of single digits.
      separate_spaces: every space is its own token (``"▁"`` as a symbol), so a word is cut into
        the same pieces after a space as inside an identifier or a JSON string (``" contact"`` ->
        ``"▁" "contact"``, ``'"contact"'`` -> ``'"' "contact" '"'``): copying a word from prose into
        a call is then copying tokens, not re-spelling them (~37% more tokens on chat text).
      letters_alone: a lone letter after a space is "▁" and the letter (`without_spaced_letters`).

    Returns:
      The serialized sentencepiece ``ModelProto``.
    """
    if vocab_size < 256 + len(CHAT_SPECIAL_TOKENS) + 4 + (len(NUMBER_CHUNKS) if number_chunks else 0):
        raise ValueError(
            f"vocab_size must leave room for 256 byte tokens and the special tokens, got {vocab_size}"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=(list(CHAT_SPECIAL_TOKENS) + (list(NUMBER_CHUNKS) if number_chunks else [])
                              + (["\u2581"] if separate_spaces else [])),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=not number_chunks,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 20,
        num_threads=min(8, os.cpu_count() or 1),
        minloglevel=2,
    )
    return without_spaced_letters(model.getvalue()) if letters_alone else model.getvalue()
