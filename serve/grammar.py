"""llguidance grammars for tool calls and JSON-schema answers, the up-front schema check, and the
vocabulary view the channel machine needs.

llguidance is the grammar backend: it runs without torch, fills a preallocated numpy bitmask
(``int32[ceil(V / 32)]``, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed), and
names the JSON Schema keywords it cannot enforce. A schema using any of those is refused here with
the whole list, never compiled in a weakened form (llguidance's ``lenient`` mode stays off).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema
import llguidance
import llguidance.numpy as llnp
import numpy as np

# Tags of the chat format (ChatML + Qwen3). Each is one special token in the vocabulary.
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
IM_END = "<|im_end|>"
CHANNEL_TAGS = (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, IM_END)

# OpenAI's rule for function names; it also keeps names free of JSON escapes.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")

# Tool calls are emitted the way chat templates render them (``tojson``: ", " and ": "), with no
# free whitespace, so a model cannot wander into runaway blanks inside a call.
TOOL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                     "lenient": False}
# Answers may be pretty-printed, but each run of whitespace is bounded: unbounded blanks inside a
# JSON answer are a known way for constrained models to never finish.
ANSWER_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}", "lenient": False}


class UnsupportedSchemaError(ValueError):
    """A JSON schema the grammar backend cannot enforce exactly.

    Attributes:
        keywords: the schema keywords llguidance does not implement (empty when the problem is
            another one, e.g. an unknown ``format``; the message then says which).
    """

    def __init__(self, where: str, keywords: Sequence[str], detail: str = ""):
        self.keywords, self.detail = tuple(keywords), detail
        if self.keywords:
            msg = (f"{where}: JSON schema keywords not supported by the grammar backend: "
                   f"{', '.join(self.keywords)}; remove them (they would not be enforced)")
        else:
            msg = f"{where}: JSON schema not supported by the grammar backend: {detail}"
        super().__init__(msg)


def _strip_keys(node: Any, keys: set[str]) -> Any:
    """Copy of a schema with ``keys`` removed at every level (to find further unsupported ones)."""
    if isinstance(node, dict):
        return {k: _strip_keys(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_strip_keys(v, keys) for v in node]
    return node


def check_schema(schema: Any, *, where: str) -> None:
    """Refuses a schema that is malformed or that llguidance cannot enforce exactly.

    Args:
        schema: a JSON Schema as a dict (or ``True``-like dict ``{}``).
        where: what the schema belongs to, for the message (e.g. ``"tools[0].parameters"``).

    Raises:
        ValueError: the schema is not an object or is not valid JSON Schema (draft 2020-12).
        UnsupportedSchemaError: it uses keywords the backend does not implement; the error lists
            all of them, not only the first one met.
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the JSON schema is not JSON-serialisable: {e}") from None
    problem = _schema_problem(key)
    if problem is None:
        return
    if problem[0] == "malformed":
        raise ValueError(f"{where}: malformed JSON schema {problem[1]}")
    raise UnsupportedSchemaError(where, problem[1], problem[2])


# Clients resend the same tools with every request: verdicts are remembered by canonical text.
@functools.lru_cache(maxsize=1024)
def _schema_problem(key: str) -> tuple | None:
    """None, ("malformed", where-and-why) or ("unsupported", keywords, detail)."""
    schema = json.loads(key)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.path) or "(root)"
        return ("malformed", f"at {path}: {e.message}")
    found: list[str] = []
    current: Any = dict(schema)
    # llguidance reports the unimplemented keys of the first subschema it fails on; strip them and
    # ask again so the user gets the complete list at once.
    for _ in range(64):
        # ``overrides`` keeps a schema's own "x-guidance": {"lenient": true} from sneaking past.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(current, overrides={"lenient": False})
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
        if not is_error:
            break
        m = _UNIMPLEMENTED.search(messages[0])
        if m is None:
            if found:  # report the keywords; the other problem surfaces once they are gone
                break
            return ("unsupported", (), messages[0].strip())
        keys = [json.loads(k) for k in m.group(1).split(",") if k.strip()]
        found += [k for k in keys if k not in found]
        current = _strip_keys(current, set(keys))
    return ("unsupported", tuple(found), "") if found else None


@dataclasses.dataclass(frozen=True)
class FunctionTool:
    """A function the model may call.

    Attributes:
        name: ``[A-Za-z0-9_-]{1,64}``.
        parameters: JSON Schema of the arguments object.
        description: shown to the model by the chat template; unused here.
    """

    name: str
    parameters: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"type": "object", "properties": {}})
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _FUNCTION_NAME.match(self.name):
            raise ValueError(f"function name {self.name!r} must match [A-Za-z0-9_-]{{1,64}}")
        params = self.parameters
        if not isinstance(params, Mapping):
            raise ValueError(f"function {self.name!r}: parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"function {self.name!r}: parameters must describe an object "
                             f"(type 'object'), got type {params.get('type')!r}")
        check_schema(params, where=f"function {self.name!r} parameters")


# Where ``closed_objects`` descends: positions where a stricter subschema can only make the whole
# schema stricter (a value's own schema). Not ``oneOf`` (exactly one: a narrower branch can turn an
# invalid double match valid), ``not``, ``if``/``then``/``else`` (they select, not describe),
# ``allOf`` or ``$defs`` (their objects may be completed by keys declared elsewhere).
_VALUE_MAPS = ("properties", "patternProperties")
_VALUE_LISTS = ("prefixItems",)
_VALUE_ONE = ("items", "additionalProperties", "contains")
# An object with one of these may take keys from somewhere else (or says what extra keys may be):
# it is left as it is.
_KEEP_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf",
              "oneOf", "not", "if", "then", "else", "$ref", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every self-contained object closed to keys it does not declare.

    JSON Schema allows keys a schema does not name unless ``additionalProperties`` says otherwise;
    a function's arguments are another matter: a key the function does not declare is a bug in
    the call, and a small model under a grammar that allows any key invents them (measured:
    kestrel-nano wrote keys such as ``": "`` until it ran out of tokens). So tool calls follow the
    strict mode of OpenAI's function calling and of xgrammar: an object schema with
    ``properties`` accepts only those keys, unless it says otherwise or combines with other
    subschemas (``allOf``, ``anyOf``, ``$ref``, ...: see ``_KEEP_OPEN``), which may declare more.
    The result is never looser than ``schema``, so every call it admits validates against the
    original.
    """
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _VALUE_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _VALUE_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _VALUE_ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = closed_objects(out[key])
    if "anyOf" in out and "properties" not in out and isinstance(out["anyOf"], list):
        out["anyOf"] = [closed_objects(v) for v in out["anyOf"]]  # whole alternatives for the value
    if "properties" in out and not any(k in schema for k in _KEEP_OPEN):
        out["additionalProperties"] = False
    return out


def tool_call_schema(tools: Sequence[FunctionTool]) -> dict[str, Any]:
    """JSON schema of one call, ``{"name": <one of tools>, "arguments": <that tool's schema>}``.

    Also a ``response_format`` for a model whose vocabulary has no ``<tool_call>`` tags: the
    call is then the whole answer.

    Args:
        tools: the functions allowed in the call.

    Returns:
        ``{"anyOf": [one closed object schema per function]}``, each function's arguments with
        their objects closed to undeclared keys (:func:`closed_objects`).
    """
    if not tools:
        raise ValueError("a tool call schema needs at least one function")
    return {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": closed_objects(t.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools]}


def tool_call_grammar(tools: Sequence[FunctionTool]) -> str:
    """Grammar of the text between ``<tool_call>`` and ``</tool_call>``.

    ``"\\n"? {"name": <one of tools>, "arguments": <that tool's schema>} "\\n"?``, with ``name``
    first (llguidance keeps the declared property order).

    Args:
        tools: the functions allowed in this call (one for a named ``tool_choice``).

    Returns:
        An llguidance grammar string for ``llguidance.LLMatcher``.
    """
    schema = {**tool_call_schema(tools), "x-guidance": TOOL_JSON_OPTIONS}  # tools' own x-guidance ignored
    lark = 'start: "\\n"? %json ' + json.dumps(schema) + ' "\\n"?'
    return llguidance.LLMatcher.grammar_from_lark(lark)


def response_format_grammar(schema: Mapping[str, Any]) -> str:
    """Grammar of a JSON answer satisfying ``schema`` (checked with :func:`check_schema` first)."""
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=ANSWER_JSON_OPTIONS)


class Utf8StreamDecoder:
    """Incremental detokenizer: token ids in, text out, never a split UTF-8 sequence.

    Bytes of a character cut across tokens are held until the character is complete; invalid
    bytes become U+FFFD. Special tokens decode to nothing.
    """

    def __init__(self, vocab: ChannelVocab):
        self._vocab = vocab
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self._vocab.token_bytes(token))

    def flush(self) -> str:
        """Ends the stream: held bytes of an unfinished character come out as U+FFFD."""
        return self._dec.decode(b"", final=True)


class ChannelVocab:
    """What the channel machine needs from a tokenizer, built once per served model.

    Holds llguidance's tokenizer (for grammar masks), the ids of the chat tags, every token's
    bytes (for detokenizing), and precomputed token classes as bitmasks.

    Args:
        ll_tokenizer: ``llguidance.LLTokenizer`` whose ``eos_token`` is ``<|im_end|>``'s id.
        vocab_size: V, the model's vocabulary (logits width; may exceed the tokenizer's).
        tag_ids: id of each tag in :data:`CHANNEL_TAGS` present in the vocabulary.
        eos_ids: ids that end the turn (``<|im_end|>`` and the tokenizer's eos).
        token_bytes: every token's bytes, when llguidance's view of them is not to be trusted
            (it renames tokens it cannot represent); default: ``ll_tokenizer.decode_bytes``.
    """

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, vocab_size: int,
                 tag_ids: Mapping[str, int], eos_ids: Sequence[int],
                 token_bytes: Sequence[bytes] | None = None):
        if IM_END not in tag_ids:
            raise ValueError(f"the vocabulary has no {IM_END} token")
        if vocab_size < ll_tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                             f"{ll_tokenizer.vocab_size}")
        self.ll_tokenizer = ll_tokenizer
        self.vocab_size = int(vocab_size)
        self.tag_ids = dict(tag_ids)
        self.eos_ids = tuple(sorted(set(eos_ids) | {self.tag_ids[IM_END]}))
        self.n_words = (self.vocab_size + 31) // 32
        n_tok = ll_tokenizer.vocab_size
        # llguidance sizes its masks by the tokenizer's ids, which the model's embedding may pad
        # (kestrel-nano: 8,604 pieces, 8,768 rows): its words are filled, the rest stay 0.
        self.ll_words = (n_tok + 31) // 32
        self._bytes = [b""] * self.vocab_size
        special = np.zeros(self.vocab_size, bool)
        special[n_tok:] = True  # padding rows of the embedding are never sampled
        for i in range(n_tok):
            if ll_tokenizer.is_special_token(i):
                special[i] = True
            else:
                self._bytes[i] = (ll_tokenizer.decode_bytes([i]) if token_bytes is None
                                  else bytes(token_bytes[i]))
                special[i] = not self._bytes[i]  # decodes to nothing: not usable as text
        special[list(self.tag_ids.values())] = True
        special[list(self.eos_ids)] = True
        self.special = special  # [V] bool
        blank = np.array([bool(b) and not b.strip(b" \t\r\n") for b in self._bytes]) & ~special
        self.text_mask = self.pack(~special)  # every ordinary token
        self.blank_mask = self.pack(blank)  # tokens made of whitespace only
        self._matchers: dict[str, llguidance.LLMatcher] = {}  # grammar -> compiled prototype

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str, *, vocab_size: int | None = None,
                            eos_ids: Sequence[int] = ()) -> ChannelVocab:
        """From a Hugging Face ``tokenizer.json`` string (``tokenizers.Tokenizer.to_str()``)."""
        added = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        if IM_END not in added:
            raise ValueError(f"tokenizer.json has no {IM_END} added token")
        ll = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=added[IM_END])
        tags = {t: added[t] for t in CHANNEL_TAGS if t in added}
        return cls(ll, vocab_size or ll.vocab_size, tags, eos_ids)

    @classmethod
    def from_token_bytes(cls, tokens: Sequence[bytes], special: Mapping[str, int],
                         encode: Callable[[str], list[int]], *, vocab_size: int | None = None,
                         eos_ids: Sequence[int] = ()) -> ChannelVocab:
        """From any tokenizer (e.g. sentencepiece): every token's bytes and an encode function.

        Args:
            tokens: bytes of token ``i`` at index ``i``: the text's UTF-8 (sentencepiece's
                U+2581 as a space), a byte-fallback piece ``<0xAB>`` as that byte, special
                tokens as their text.
            special: every special token's text -> id (must include ``<|im_end|>``).
            encode: text -> ids, without special-token parsing.
        """
        wrapper = llguidance.TokenizerWrapper(_EncodeAdapter(tokens, special, encode))
        ll = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size)
        tags = {t: special[t] for t in CHANNEL_TAGS if t in special}
        return cls(ll, vocab_size or len(tokens), tags, eos_ids, token_bytes=tokens)

    def token_bytes(self, token: int) -> bytes:
        """UTF-8 bytes of an ordinary token; ``b""`` for special and padding ids."""
        return self._bytes[token]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; chat tags in it become their special tokens."""
        return self.ll_tokenizer.tokenize_str(text, parse_special=True)

    def stream_decoder(self) -> Utf8StreamDecoder:
        return Utf8StreamDecoder(self)

    def pack(self, allowed: np.ndarray) -> np.ndarray:
        """[V] bool -> bitmask int32[ceil(V/32)], the layout llguidance fills."""
        bits = np.zeros(self.n_words * 32, bool)
        bits[: self.vocab_size] = allowed
        return np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32)[:, 0].copy()

    def mask_of(self, ids: Sequence[int]) -> np.ndarray:
        """Bitmask allowing exactly ``ids``."""
        m = np.zeros(self.n_words, np.int32)
        for t in ids:
            set_bit(m, t)
        return m

    def new_matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for ``grammar``: compiled once (ms), then deep-copied (us)."""
        proto = self._matchers.get(grammar)
        if proto is None:
            proto = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if proto.is_error():
                raise ValueError(f"grammar rejected by llguidance: {proto.get_error()}")
            if len(self._matchers) >= 256:
                self._matchers.pop(next(iter(self._matchers)))  # oldest first
            self._matchers[grammar] = proto
        return proto.deep_copy()

    def fill_mask(self, matcher: llguidance.LLMatcher, out: np.ndarray) -> None:
        """Writes the matcher's next-token bitmask into ``out`` (int32[ceil(V/32)]) in place."""
        out[self.ll_words:] = 0
        llnp.fill_next_token_bitmask(matcher, out[:self.ll_words].reshape(1, -1))

    def fill_masks(self, executor: llguidance.LLExecutor, rows: Sequence[tuple[llguidance.LLMatcher, int]],
                   out: np.ndarray) -> None:
        """Writes each ``(matcher, row)``'s bitmask into ``out[row]`` (int32[B, ceil(V/32)]), in
        parallel on llguidance's threads."""
        if self.ll_words == out.shape[1]:
            llnp.fill_next_token_bitmask_par(executor, list(rows), out)
            return
        narrow = np.zeros((out.shape[0], self.ll_words), np.int32)
        llnp.fill_next_token_bitmask_par(executor, list(rows), narrow)
        for _, i in rows:
            out[i, :self.ll_words] = narrow[i]
            out[i, self.ll_words:] = 0


class _EncodeAdapter:
    """The attributes ``llguidance.TokenizerWrapper`` reads, plus ``__call__`` = encode."""

    def __init__(self, tokens, special, encode):
        self.tokens = list(tokens)
        self.eos_token_id = special[IM_END] if IM_END in special else None
        self.bos_token_id = None
        self.special_token_ids = sorted(special.values())
        self._encode = encode

    def __call__(self, s):
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        return list(self._encode(s))


def set_bit(mask: np.ndarray, token: int) -> None:
    mask[token >> 5] |= np.int32(np.uint32(1 << (token & 31)).view(np.int32))


def clear_bit(mask: np.ndarray, token: int) -> None:
    mask[token >> 5] &= np.int32(np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF).view(np.int32))


def has_bit(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def unpack_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bitmask int32[ceil(V/32)] -> [V] bool (for tests and for samplers that want booleans)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
