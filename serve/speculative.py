"""Speculative decoding: the config, prompt-lookup (n-gram) drafts and the acceptance monitor.

Each decode step the engine asks the proposer how many draft tokens a request may verify (its
``num_lookahead_tokens``); the scheduler reserves that many K/V slots past the last token; the
runner asks the proposer for the drafts, feeds the last token plus the drafts to the target in one
pass (``serve.runner._verify_step``) and verifies them (``serve.rejection``); the scheduler
commits the accepted drafts plus the target's own token and frees the slots of rejected ones.

Two proposers, named after vLLM's ``speculative_config`` methods:

- ``ngram`` (prompt lookup): the last n tokens of prompt + output (n from ``prompt_lookup_max``
  down to ``prompt_lookup_min``) are searched for earlier in the same sequence, and the tokens
  that followed the latest earlier occurrence are the draft. Free to propose; strong when the
  output quotes the input (code edits, summaries with quotes, repeated JSON keys).
- ``draft``: a smaller checkpoint with the same tokenizer proposes k tokens autoregressively
  (``serve.draft_model``).

Requests opt out with ``EngineRequest(speculative=False)``. Requests with repetition, frequency
or presence penalties or with logprobs decode without drafts: their per-position processing
differs along the draft (penalties) or their reports would need every position (logprobs).
``AcceptanceMonitor`` switches speculation off for a request whose acceptance rate stays below
the threshold, and pauses it server-wide while the recent rate of all requests does.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from serve.request import Request
from serve.runner import Draft
from serve.scheduler import ScheduledRequest

METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine speculates.

    Attributes:
      method: ``ngram`` (prompt lookup) or ``draft`` (a draft model).
      num_speculative_tokens: k, most drafts verified per step.
      prompt_lookup_max, prompt_lookup_min: n-gram lengths tried, longest first (``ngram``).
      draft_model: the draft ``Transformer`` (``draft``).
      draft_tokenizer: its tokenizer, checked against the target's at engine start (``draft``).
      min_acceptance_rate: below this rate (accepted / drafted) speculation is switched off.
      acceptance_window: drafted tokens after which a request's rate is judged; the server judges
        its last ``8 * acceptance_window`` drafted tokens.
      pause_steps: engine steps the server pauses speculation after a poor server-wide rate.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    draft_model: Any = None
    draft_tokenizer: Any = None
    min_acceptance_rate: float = 0.1
    acceptance_window: int = 32
    pause_steps: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "acceptance_window", "pause_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.prompt_lookup_max, int) or self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max must be an int >= prompt_lookup_min="
                             f"{self.prompt_lookup_min}, got {self.prompt_lookup_max!r}")
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("speculative method 'draft' needs a draft_model (--draft-model CKPT)")
        if self.method == "ngram" and self.draft_model is not None:
            raise ValueError("a draft_model was given but the speculative method is 'ngram'")


def ngram_draft(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup: up to ``k`` tokens that followed the latest earlier occurrence of the last
    n tokens, for the longest n in ``[min_n, max_n]`` that occurs; ``[]`` when none does."""
    seq = np.asarray(tokens, np.int64)
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = seq[length - n:]
        # Candidate starts i with seq[i:i+n] == suffix and at least one token after it, i + n < L.
        windows = np.lib.stride_tricks.sliding_window_view(seq[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(x) for x in seq[start:start + k]]
    return []


class NgramProposer:
    """Prompt-lookup drafts from the request's own prompt + output (host only, no model)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def draft(self, request: Request, k: int) -> list[int]:
        c = self.config
        return ngram_draft(request.all_token_ids, k, c.prompt_lookup_min, c.prompt_lookup_max)

    def lookahead(self, request: Request, k: int) -> int:
        """Slots to reserve: exactly the draft's length (no draft: a plain decode)."""
        return len(self.draft(request, k))

    def propose(self, entries: Sequence[ScheduledRequest], masks) -> dict[str, Draft]:
        return {e.request_id: Draft(tuple(self.draft(e.request, e.num_lookahead))) for e in entries}

    def release(self, request_ids: Sequence[str]) -> None:
        """Nothing is kept per request."""


@dataclasses.dataclass
class _Rate:
    drafted: int = 0
    accepted: int = 0


class AcceptanceMonitor:
    """Switches speculation off where drafts are mostly rejected (they then only cost compute).

    A request is judged once it has drafted ``acceptance_window`` tokens, and again every window
    after; below ``min_acceptance_rate`` it decodes without drafts from then on. The server keeps
    the counts of its last ``8 * acceptance_window`` drafted tokens; below the rate it pauses all
    speculation for ``pause_steps`` steps, then tries again with a fresh window.
    """

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self._requests: dict[str, _Rate] = {}
        self._off: set[str] = set()
        self._recent: collections.deque[tuple[int, int]] = collections.deque()
        self._recent_drafted = self._recent_accepted = 0
        self.paused_until = -1
        self.num_pauses = 0
        self.drafted = self.accepted = 0  # server totals

    def allows(self, request_id: str, step: int) -> bool:
        return step >= self.paused_until and request_id not in self._off

    def record(self, request_id: str, drafted: int, accepted: int, step: int) -> None:
        if drafted <= 0:
            return
        c = self.config
        self.drafted += drafted
        self.accepted += accepted
        r = self._requests.setdefault(request_id, _Rate())
        before = r.drafted // c.acceptance_window
        r.drafted += drafted
        r.accepted += accepted
        if r.drafted // c.acceptance_window > before and r.accepted < c.min_acceptance_rate * r.drafted:
            self._off.add(request_id)
        self._recent.append((drafted, accepted))
        self._recent_drafted += drafted
        self._recent_accepted += accepted
        window = 8 * c.acceptance_window
        while self._recent_drafted - self._recent[0][0] >= window:
            d, a = self._recent.popleft()
            self._recent_drafted -= d
            self._recent_accepted -= a
        if self._recent_drafted >= window and self._recent_accepted < c.min_acceptance_rate * self._recent_drafted:
            self.paused_until = step + c.pause_steps
            self.num_pauses += 1
            self._recent.clear()
            self._recent_drafted = self._recent_accepted = 0

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._off.discard(request_id)

    def request_rate(self, request_id: str) -> float | None:
        r = self._requests.get(request_id)
        return r.accepted / r.drafted if r and r.drafted else None


def build_proposer(config: SpeculativeConfig, *, target, target_tokenizer, kv, attn_impl: str):
    """The proposer of ``config.method`` (the draft model's tokenizer is checked here)."""
    if config.method == "ngram":
        return NgramProposer(config)
    from serve.draft_model import DraftModelProposer  # JAX model state: only when asked for
    return DraftModelProposer(config, target=target, target_tokenizer=target_tokenizer, kv=kv,
                              attn_impl=attn_impl)


def spec_usage_fields(drafted: int, accepted: int) -> Mapping[str, int]:
    """Usage fields of a request that drafted ``drafted`` tokens and kept ``accepted``."""
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": drafted - accepted}
