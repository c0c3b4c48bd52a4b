"""Rebuild a Hugging Face ``tokenizers.Tokenizer`` from the vocabulary a GGUF file stores.

A GGUF has no ``tokenizer.json``: llama.cpp keeps the tokens, merges, token types and scores as
metadata. We rebuild the same pipeline transformers' GGUF loader builds
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py`` and the ``GPT2Tokenizer`` /
``LlamaTokenizer`` / ``GemmaTokenizer`` backends it hands the vocabulary to), so that ids match
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` exactly, without importing transformers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from kestrel.errors import KestrelError

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex its merges were learned with (others keep GPT-2's).
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}

SUPPORTED_TYPES = ("gpt2", "llama")


@dataclasses.dataclass
class GGUFTokenizerData:
    """What a GGUF says about its tokenizer.

    Attributes:
      backend: the rebuilt ``tokenizers.Tokenizer`` (no post-processor: BOS is added by the caller).
      bos_token, eos_token, unk_token, pad_token: token strings, or None where the file has no id.
      add_bos_token: whether prompts start with BOS (llama.cpp's rule for sentencepiece vocabularies).
      chat_template: the Jinja template text, or None.
    """

    backend: HFTokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None


def read_tokenizer_metadata(path: str | os.PathLike | gguf.GGUFReader) -> dict[str, Any]:
    """Reads the ``general.architecture`` and ``tokenizer.*`` fields of a GGUF file as Python values.

    Args:
      path: the file, or a ``gguf.GGUFReader`` already open on it (opening one parses every
        metadata array, which takes seconds for a large vocabulary, so a converter can share it).
    """
    if isinstance(path, gguf.GGUFReader):
        reader = path
    else:
        try:
            reader = gguf.GGUFReader(os.fspath(path))
        except (OSError, ValueError) as e:  # gguf raises ValueError on a bad magic or version
            raise KestrelError(f"cannot read GGUF file {os.fspath(path)!r}: {e}") from e
    fields = {}
    for name, field in reader.fields.items():
        if name == "general.architecture" or name.startswith("tokenizer."):
            fields[name] = field.contents()
    return fields


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies use."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def generate_merges(vocab: dict[str, int], vocab_scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two known tokens,
    best score first (transformers' ``generate_merges``, which llama GGUFs without merges need)."""
    merges = []
    for merge, piece_score in vocab_scores.items():
        local = []
        for index in range(1, len(merge)):
            left, right = merge[:index], merge[index:]
            if left in vocab and right in vocab:
                local.append((left, right, piece_score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(m[0], m[1]) for m in merges]


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    return [tuple(m.split(" ")) for m in merges]


def _byte_level(meta: dict[str, Any]) -> HFTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = _file_merges(meta)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        merges = generate_merges(vocab, dict(zip(vocab, scores))) if scores is not None else []
    tok = HFTokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(
    meta: dict[str, Any], tokens: list[str], vocab_scores: dict[str, float] | None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _file_merges(meta)
    if merges is None:
        if vocab_scores is None:
            vocab_scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
        merges = generate_merges(vocab, vocab_scores)
    return vocab, merges


def _llama(meta: dict[str, Any]) -> HFTokenizer:
    vocab, merges = _sentencepiece(meta, list(meta["tokenizer.ggml.tokens"]), None)
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # Like LlamaTokenizer (legacy=False): one "▁" before the first word only, stripped again on decode.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _phi3(meta: dict[str, Any]) -> HFTokenizer:
    tok = _llama(meta)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")]
    )
    tok.pre_tokenizer = None
    return tok


def _gemma(meta: dict[str, Any]) -> HFTokenizer:
    # Gemma GGUFs store whitespace-only tokens with real spaces and list no merges; the merge order
    # follows the file order, not the scores (see transformers' gemma_tokenizer).
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    positions = {token: -index for index, token in enumerate(tokens)}
    vocab, merges = _sentencepiece(meta, tokens, positions)
    tok = HFTokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


_SENTENCEPIECE_BY_ARCH = {"gemma": _gemma, "gemma2": _gemma, "gemma3": _gemma, "phi3": _phi3}


def _add_marked_tokens(tok: HFTokenizer, meta: dict[str, Any]) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so
    that both stay whole in text (as llama.cpp and transformers do)."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or ()
    spelled = set(bytes_to_unicode().values()) if meta["tokenizer.ggml.model"] == "gpt2" else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types)
        # A control token outside the byte alphabet of a byte-level vocab is a llama.cpp mislabel.
        if kind == _CONTROL and (spelled is None or set(t) <= spelled)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def tokenizer_from_gguf(path: str | os.PathLike | gguf.GGUFReader) -> GGUFTokenizerData:
    """Builds the tokenizer a GGUF file describes.

    Args:
      path: the ``.gguf`` file, or a ``gguf.GGUFReader`` open on it.

    Returns:
      The rebuilt tokenizer and its special tokens.

    Raises:
      KestrelError: the file is unreadable, has no tokenizer, or a tokenizer type we cannot build.
    """
    meta = read_tokenizer_metadata(path)
    if isinstance(path, gguf.GGUFReader):
        path = getattr(path.data, "filename", None) or "GGUF file"  # for error messages
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise KestrelError(f"GGUF file {os.fspath(path)!r} has no tokenizer (no tokenizer.ggml.model/tokens)")
    arch = meta.get("general.architecture", "")
    if kind == "gpt2":
        tok = _byte_level(meta)
    elif kind == "llama":
        tok = _SENTENCEPIECE_BY_ARCH.get(arch, _llama)(meta)
    else:
        raise KestrelError(
            f"GGUF file {os.fspath(path)!r} has tokenizer type {kind!r} (tokenizer.ggml.model); "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    _add_marked_tokens(tok, meta)
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    tokens = meta["tokenizer.ggml.tokens"]

    def named(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    specials = {name: named(key) for name, key in
                [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                 ("pad", "padding_token_id")]}
    # transformers makes every named special token an added special token too.
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(specials.values())
               if s is not None and s not in added]
    if missing:
        tok.add_tokens(missing)
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return GGUFTokenizerData(
        backend=tok,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token=specials["unk"],
        pad_token=specials["pad"],
        add_bos_token=bool(add_bos) and specials["bos"] is not None,
        chat_template=meta.get("tokenizer.chat_template"),
    )
