"""The engine's per-request state: sampling parameters, status, tokens and progress counters.

Pure Python (no JAX): the scheduler and the KV-page manager read and advance this state; the
model runner reads the sampling parameters and the token history (for penalties).

Token accounting, the numbers the API reports as usage:

- ``num_computed_tokens``: how many of ``prompt + output`` tokens have their K/V in the cache now.
  It is the position where the next prefill chunk (or decode token) starts, and drops to 0 when
  the request is preempted (its pages are freed and recomputed later).
- ``num_cached_tokens``: tokens that a prefix-cache hit supplied at the first admission (the
  ``cached_tokens`` of usage reports); a later recompute after a preemption does not change it.
- ``total_computed_tokens``: tokens the model runner actually computed for this request, recomputes
  included. A second conversation turn that hits the cache for its first turn shows a small number.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

# OpenAI's API caps top_logprobs at 20; larger values cost a full-vocabulary sort per token.
MAX_TOP_LOGPROBS = 20


class RequestStatus(enum.StrEnum):
    """Where a request is in the scheduler."""

    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # holds KV pages; scheduled every step its budget allows
    PREEMPTED = "preempted"  # pages taken back; waits to recompute prompt + outputs
    FINISHED = "finished"  # pages freed; see finish_reason


class FinishReason(enum.StrEnum):
    """Why a request stopped; the strings are those of the API's ``finish_reason``."""

    STOP = "stop"  # sampled one of the stop token ids
    LENGTH = "length"  # reached max_tokens
    CANCELLED = "cancelled"  # the client cancelled
    DEADLINE = "deadline"  # its deadline passed
    ERROR = "error"  # the engine aborted it after a failure


def _check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    # bool is an int subclass; max_tokens=True is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_br = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {lo_br}{lo}, {hi}], got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Attributes:
      max_tokens: most output tokens to generate (>= 1).
      temperature: softmax temperature, >= 0; 0 means greedy (argmax).
      top_k: keep the k most likely tokens; 0 disables.
      top_p: nucleus sampling mass in (0, 1]; 1 disables.
      min_p: drop tokens below ``min_p * p_max``, in [0, 1]; 0 disables.
      seed: per-request RNG seed for reproducible sampling; ``None`` draws from the engine's RNG.
      repetition_penalty: > 0; divides positive logits (multiplies negative ones) of tokens already
        in the prompt or output; 1 disables.
      frequency_penalty: in [-2, 2]; subtracted once per earlier occurrence in the output.
      presence_penalty: in [-2, 2]; subtracted once if the token occurred in the output.
      stop_token_ids: sampling any of these finishes the request with reason ``stop``; the stop
        token is appended to the output (the engine decides whether to show it).
      logprobs: return the log-probability of each sampled token.
      top_logprobs: also return that many most likely alternatives per step (0..20); needs
        ``logprobs``.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed)
        floats = {
            "temperature": (0.0, math.inf, False),
            "top_p": (0.0, 1.0, True),
            "min_p": (0.0, 1.0, False),
            "repetition_penalty": (0.0, math.inf, True),
            "frequency_penalty": (-2.0, 2.0, False),
            "presence_penalty": (-2.0, 2.0, False),
        }
        for name, (lo, hi, lo_open) in floats.items():
            # Stored as float so the runner builds float arrays from them without surprises.
            object.__setattr__(self, name, _check_float(name, getattr(self, name), lo, hi, lo_open=lo_open))
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise ValueError(f"stop_token_ids must be a sequence of ints, got {self.stop_token_ids!r}")
        stop = tuple(_check_int("stop_token_ids[]", t, minimum=0) for t in self.stop_token_ids)
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")
        _check_int("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs > 0 needs logprobs=True")

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax (temperature 0)."""
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class MultiModalSpan:
    """A run of placeholder tokens that stands for one image (or other non-text input).

    Placeholder token ids are the same for every image, so the prefix cache keys every page this
    span overlaps with ``content_hash`` too: two prompts with equal tokens but different images
    never share pages.

    Attributes:
      offset: index of the span's first token in the prompt.
      length: number of placeholder tokens (>= 1).
      content_hash: a hash of the image content (e.g. sha256 hex of its bytes).
    """

    offset: int
    length: int
    content_hash: str

    def __post_init__(self):
        _check_int("MultiModalSpan.offset", self.offset, minimum=0)
        _check_int("MultiModalSpan.length", self.length, minimum=1)
        if not isinstance(self.content_hash, str) or not self.content_hash:
            raise ValueError(f"MultiModalSpan.content_hash must be a non-empty str, got {self.content_hash!r}")


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its mutable engine state.

    Attributes:
      request_id: unique among live requests.
      prompt_token_ids: the prompt, non-empty, as token ids.
      params: sampling parameters.
      arrival_time: when it arrived, on the scheduler's clock; the scheduler stamps it on ``add`` if
        ``None``. Earlier arrival means higher priority (later arrivals are preempted first).
      deadline: absolute time on the scheduler's clock after which it finishes with ``deadline``;
        ``None`` for no deadline.
      mm_spans: image placeholder spans in the prompt (keys for the prefix cache), in order.
      mm_inputs: per span, the preprocessed image (``[S, S, C]`` float32, the tower's input) the
        runner encodes when its embeddings are not cached; empty for none.
      cache_salt: isolates prefix-cache sharing (e.g. per tenant); requests share pages only when
        their salts are equal.
      wants_hidden: the runner returns the prompt's last hidden state with the first sampled
        token (``effort="auto"`` predicts the reasoning budget from it).
      status, output_token_ids, num_computed_tokens, num_cached_tokens, total_computed_tokens,
      num_preemptions, finish_reason, first_scheduled_time, finish_time, num_lookahead_tokens:
        engine state (see the module docstring); not constructor arguments.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_time: float | None = None
    deadline: float | None = None
    mm_spans: tuple[MultiModalSpan, ...] = ()
    mm_inputs: tuple = ()
    cache_salt: str | None = None
    wants_hidden: bool = False

    status: RequestStatus = dataclasses.field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    num_computed_tokens: int = dataclasses.field(default=0, init=False)
    num_cached_tokens: int = dataclasses.field(default=0, init=False)
    total_computed_tokens: int = dataclasses.field(default=0, init=False)
    num_preemptions: int = dataclasses.field(default=0, init=False)
    finish_reason: FinishReason | None = dataclasses.field(default=None, init=False)
    first_scheduled_time: float | None = dataclasses.field(default=None, init=False)
    finish_time: float | None = dataclasses.field(default=None, init=False)
    # Draft tokens the engine wants verified in the next decode step (speculative decoding): the
    # scheduler reserves this many K/V slots past the last token; 0 means a plain decode.
    num_lookahead_tokens: int = dataclasses.field(default=0, init=False)
    # Prefix-cache keys of the full pages of prompt + output, extended lazily by the KV manager.
    page_hashes: list[bytes] = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {self.request_id!r}")
        if isinstance(self.prompt_token_ids, (str, bytes)) or not isinstance(self.prompt_token_ids, Sequence):
            raise ValueError(f"prompt_token_ids must be a sequence of ints, got {type(self.prompt_token_ids).__name__}")
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty")
        for t in self.prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"request {self.request_id!r}: prompt token ids must be ints >= 0, got {t!r}")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(self.params).__name__}")
        self.mm_spans = tuple(self.mm_spans)
        for span in self.mm_spans:
            if not isinstance(span, MultiModalSpan):
                raise ValueError(f"mm_spans entries must be MultiModalSpan, got {span!r}")
            if span.offset + span.length > len(self.prompt_token_ids):
                raise ValueError(
                    f"request {self.request_id!r}: image span [{span.offset}, {span.offset + span.length}) "
                    f"runs past the prompt of {len(self.prompt_token_ids)} tokens"
                )
        self.mm_inputs = tuple(self.mm_inputs)
        if self.mm_inputs and len(self.mm_inputs) != len(self.mm_spans):
            raise ValueError(f"request {self.request_id!r}: {len(self.mm_inputs)} mm_inputs for "
                             f"{len(self.mm_spans)} mm_spans")
        ends = [(s.offset, s.offset + s.length) for s in self.mm_spans]
        if any(b[0] < a[1] for a, b in zip(ends, ends[1:])):
            raise ValueError(f"request {self.request_id!r}: mm_spans must be in order and not overlap")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"cache_salt must be a str or None, got {self.cache_salt!r}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """Prompt followed by output tokens (a copy)."""
        return self.prompt_token_ids + tuple(self.output_token_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids ``[start, stop)`` of prompt + output, without copying the whole history."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return list(self.prompt_token_ids[start:stop])
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return list(self.prompt_token_ids[start:]) + self.output_token_ids[: stop - p]
