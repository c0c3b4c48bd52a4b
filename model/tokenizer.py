"""One tokenizer interface over ``tokenizer.json``, sentencepiece models and GGUF vocabularies.

A Kestrel checkpoint folder holds ``tokenizer.json`` or ``tokenizer.model`` plus
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``stop_tokens``, ``pad_token``,
``unk_token``, ``add_bos_token``, ``chat_template``). ``Tokenizer.from_hf_dir`` and
``Tokenizer.from_gguf`` read foreign checkpoints; ``save`` writes the Kestrel form.

    tok = Tokenizer.from_gguf("SmolLM2.gguf")
    ids = tok.encode(tok.chat_template.render(messages))
    text = tok.decode(ids)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import gguf

from kestrel.errors import KestrelError
from model.chat_template import KESTREL_TEMPLATE, ChatTemplate
from model.gguf_tokenizer import tokenizer_from_gguf
from model.tokenizer_backends import (
    CHAT_SPECIAL_TOKENS,
    HFBackend,
    SentencePieceBackend,
    train_sentencepiece_proto,
    without_spaced_letters,
)

CONFIG_FILE = "tokenizer_config.json"
# End-of-turn markers of the chat formats we serve; each one present in a vocabulary is a stop token.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
# Ids a StreamDecoder holds back at most while waiting for the rest of a UTF-8 character.
_MAX_HELD_IDS = 6


def _token_string(value: Any) -> str | None:
    """A special token from a HF config: a string, or a serialized ``AddedToken`` dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KestrelError(f"cannot read {os.fspath(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise KestrelError(f"{os.fspath(path)!r} must hold a JSON object")
    return data


def _template_text(value: Any, where: str) -> str | None:
    """``chat_template`` is a string, or (older transformers) a list of ``{name, template}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
    raise KestrelError(f"{where}: chat_template must be a string or a list of named templates")


class StreamDecoder:
    """Turns token ids, one at a time, into text, holding back incomplete UTF-8 characters.

    Decodes a short window of recent ids (as vLLM's incremental detokenizer does) so that
    context-dependent decoders (a sentencepiece leading space, byte fallback) give the same
    text as one ``decode`` of the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids before it have produced the text emitted so far

    def push(self, token_id: int) -> str:
        """Adds one id; returns the newly complete text (possibly empty)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        # A UTF-8 character spans at most 4 byte tokens; a longer U+FFFD tail is real text
        # (e.g. invalid bytes the model produced), so emit it rather than hold back forever.
        stuck = len(self._ids) - self._read > _MAX_HELD_IDS
        if len(new_text) > len(prefix_text) and (final or stuck or not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""


class Tokenizer:
    """Text <-> token ids, the special tokens, and the checkpoint's chat template.

    Build one with ``load``, ``from_hf_dir``, ``from_gguf`` or ``train_sentencepiece``.

    Attributes:
      bos_token, eos_token, pad_token, unk_token: token strings or None.
      add_bos_token: whether ``encode(..., add_special_tokens=True)`` prepends BOS.
      stop_tokens: extra strings that end generation besides EOS.
      chat_template: a ``ChatTemplate``, or None when the checkpoint has none.
    """

    def __init__(
        self,
        backend: HFBackend | SentencePieceBackend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        stop_tokens: Iterable[str] = (),
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        self._backend = backend
        self._source = source
        for t in (bos_token, eos_token):
            if t is not None and backend.token_to_id(t) is None:
                raise KestrelError(f"{source}: special token {t!r} is not in the vocabulary")
        # A pad/unk token the vocabulary lacks is dropped: padding falls back to EOS.
        pad_token = pad_token if pad_token is not None and backend.token_to_id(pad_token) is not None else None
        unk_token = unk_token if unk_token is not None and backend.token_to_id(unk_token) is not None else None
        named = [t for t in (bos_token, eos_token, pad_token, unk_token) if t is not None]
        backend.ensure_added(named, special=True)
        backend.ensure_added(list(CHAT_SPECIAL_TOKENS), special=False)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos_token = bool(add_bos_token) and bos_token is not None
        self.stop_tokens = [
            t for t in dict.fromkeys(stop_tokens) if t != eos_token and backend.token_to_id(t) is not None
        ]
        self._template_source = chat_template
        self.chat_template = None
        if chat_template is not None:
            self.chat_template = ChatTemplate(
                chat_template, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
                name=f"{source} chat template",
            )

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Reads a Kestrel checkpoint folder (``tokenizer.json``/``tokenizer.model`` + config)."""
        d = Path(directory)
        config_path = d / CONFIG_FILE
        if not config_path.is_file():
            raise KestrelError(f"{os.fspath(d)!r} has no {CONFIG_FILE}")
        config = _read_json(config_path)
        backend = cls._backend_in(d)
        return cls(
            backend,
            bos_token=_token_string(config.get("bos_token")),
            eos_token=_token_string(config.get("eos_token")),
            pad_token=_token_string(config.get("pad_token")),
            unk_token=_token_string(config.get("unk_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            stop_tokens=config.get("stop_tokens", ()),
            chat_template=_template_text(config.get("chat_template"), os.fspath(config_path)),
            source=os.fspath(d),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Reads a Hugging Face model folder.

        Uses ``tokenizer.json`` (else ``tokenizer.model``), ``tokenizer_config.json`` and
        ``special_tokens_map.json`` for the special tokens, ``chat_template.jinja`` (else the
        config's ``chat_template``), and ``generation_config.json``'s ``eos_token_id`` as stop ids.
        """
        d = Path(directory)
        if not d.is_dir():
            raise KestrelError(f"model folder {os.fspath(d)!r} does not exist")
        config = _read_json(d / CONFIG_FILE) if (d / CONFIG_FILE).is_file() else {}
        map_path = d / "special_tokens_map.json"
        specials_map = _read_json(map_path) if map_path.is_file() else {}
        backend = cls._backend_in(d)

        def special(name: str) -> str | None:
            return _token_string(config.get(name)) or _token_string(specials_map.get(name))

        bos, eos, pad, unk = special("bos_token"), special("eos_token"), special("pad_token"), special("unk_token")
        extra = [_token_string(t) for t in specials_map.get("additional_special_tokens", [])]
        backend.ensure_added([t for t in extra if t], special=True)
        stop = []
        if (d / "generation_config.json").is_file():
            eos_ids = _read_json(d / "generation_config.json").get("eos_token_id")
            eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
            stop = [backend.id_to_token(i) for i in eos_ids if backend.id_to_token(i) is not None]
            if eos is None and stop:
                eos = stop[0]
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            bos_id = backend.token_to_id(bos) if bos is not None else None
            # A tokenizer.json's post-processor says it; sentencepiece (Llama/Gemma) adds BOS by default.
            add_bos = bos_id is not None and (isinstance(backend, SentencePieceBackend)
                                              or backend.post_processor_adds(bos_id))
        jinja = d / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else _template_text(
            config.get("chat_template"), os.fspath(d / CONFIG_FILE))
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, add_bos_token=add_bos,
                   stop_tokens=stop, chat_template=template, source=os.fspath(d))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike | gguf.GGUFReader) -> Tokenizer:
        """Rebuilds the tokenizer stored in a GGUF file's metadata (gpt2 BPE or llama vocab).

        Args:
          path: the ``.gguf`` file, or a ``gguf.GGUFReader`` already open on it (a converter that
            reads the tensors too saves parsing the metadata twice).
        """
        data = tokenizer_from_gguf(path)
        if isinstance(path, gguf.GGUFReader):
            path = getattr(path.data, "filename", None) or "GGUF file"
        return cls(
            HFBackend(data.backend),
            bos_token=data.bos_token,
            eos_token=data.eos_token,
            pad_token=data.pad_token,
            unk_token=data.unk_token,
            add_bos_token=data.add_bos_token,
            chat_template=data.chat_template,
            source=os.fspath(path),
        )

    @classmethod
    def train_sentencepiece(
        cls, lines: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None, *,
        number_chunks: bool = False, separate_spaces: bool = False, letters_alone: bool = False,
    ) -> Tokenizer:
        """Trains Kestrel's own tokenizer (BPE, byte fallback, chat tokens as symbols, ChatML template).

        Args:
          lines: training text.
          vocab_size: target vocabulary size.
          path: a folder to save the result in, or None.
          number_chunks: numbers as three-digit chunks instead of single digits (see
            ``train_sentencepiece_proto``).
          separate_spaces: every space its own token (see ``train_sentencepiece_proto``).
          letters_alone: a lone letter after a space is two tokens (``without_spaced_letters``).
        """
        backend = SentencePieceBackend(train_sentencepiece_proto(lines, vocab_size, number_chunks=number_chunks,
                                                                 separate_spaces=separate_spaces,
                                                                 letters_alone=letters_alone))
        tok = cls(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                  add_bos_token=False, stop_tokens=["<|im_end|>"], chat_template=KESTREL_TEMPLATE,
                  source="trained sentencepiece")
        if path is not None:
            tok.save(path)
        return tok

    @staticmethod
    def _backend_in(d: Path) -> HFBackend | SentencePieceBackend:
        if not d.is_dir():
            raise KestrelError(f"tokenizer folder {os.fspath(d)!r} does not exist")
        if (d / HFBackend.file_name).is_file():
            return HFBackend.from_file(d / HFBackend.file_name)
        if (d / SentencePieceBackend.file_name).is_file():
            return SentencePieceBackend.from_file(d / SentencePieceBackend.file_name)
        raise KestrelError(
            f"{os.fspath(d)!r} has no tokenizer: expected {HFBackend.file_name} or "
            f"{SentencePieceBackend.file_name}"
        )

    def with_chat_template(self, chat_template: str | None) -> Tokenizer:
        """This tokenizer with another chat template (the vocabulary and special tokens shared)."""
        return self._with(self._backend, chat_template)

    def with_letters_alone(self) -> Tokenizer:
        """This tokenizer with a lone letter after a space cut as "▁" and the letter
        (`without_spaced_letters`): every id keeps its number.

        Raises:
          KestrelError: the vocabulary is not a sentencepiece model.
        """
        if not isinstance(self._backend, SentencePieceBackend):
            raise KestrelError("only a sentencepiece tokenizer (tokenizer.model) can cut letters alone")
        return self._with(SentencePieceBackend(without_spaced_letters(self._backend.proto)), self._template_source)

    def _with(self, backend: HFBackend | SentencePieceBackend, chat_template: str | None) -> Tokenizer:
        return Tokenizer(backend, bos_token=self.bos_token, eos_token=self.eos_token,
                         pad_token=self.pad_token, unk_token=self.unk_token, add_bos_token=self.add_bos_token,
                         stop_tokens=self.stop_tokens, chat_template=chat_template,
                         source=self._source)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the Kestrel form: the tokenizer file plus ``tokenizer_config.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(d)
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "stop_tokens": self.stop_tokens,
            "add_bos_token": self.add_bos_token,
        }
        if self._template_source is not None:
            config["chat_template"] = self._template_source
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their single ids.

        Args:
          text: the text.
          add_special_tokens: prepend BOS when the checkpoint asks for it (``add_bos_token``).
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos_token:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens written out unless ``skip_special_tokens``)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental detokenizer: ``.push(id) -> str`` returns only complete characters."""
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None if the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The token string of one id (in the vocabulary's own spelling), or None if out of range."""
        return self._backend.id_to_token(int(index))

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes, index = id (for grammar engines such as llguidance, and byte-level
        detokenizing): the text a token adds, with special tokens as their own text. Note that a
        sentencepiece-style tokenizer strips the first token's leading space on decode."""
        return self._backend.token_bytes()

    # ---- special tokens -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows the embedding table needs: the largest id plus one."""
        return self._backend.vocab_size

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The padding id; EOS where the checkpoint names no pad token."""
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS, the configured stop tokens, and end-of-turn markers."""
        tokens = [self.eos_token, *self.stop_tokens, *_END_OF_TURN]
        return {i for i in (self._id(t) for t in tokens) if i is not None}

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special token the tokenizer knows, by its string (e.g. ``"<think>"``): the named
        ones (BOS, EOS, ...), the vocabulary's control tokens, and DESIGN.md's chat tokens."""
        tokens = [self.bos_token, self.eos_token, self.pad_token, self.unk_token,
                  *self._backend.special_tokens(), *CHAT_SPECIAL_TOKENS]
        return {t: i for t in tokens if t is not None and (i := self._id(t)) is not None}

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Renders a conversation with this checkpoint's chat template.

        Raises:
          KestrelError: the checkpoint has no chat template.
        """
        if self.chat_template is None:
            raise KestrelError("this tokenizer has no chat template")
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
        )
