"""The serving scheduler: queues, admission, chunked prefill, preemption, cancellation, deadlines.

Pure Python (no JAX). The engine loop is::

    out = scheduler.schedule()          # what to compute this step
    sampled = runner.execute(out)       # {request_id: token id} for entries with samples=True
    results = scheduler.update(out, sampled)

Like vLLM v1 there are no separate prefill and decode phases: a request has ``num_tokens``
(prompt + outputs) and ``num_computed_tokens``; each step gives it up to ``prefill_chunk_size``
of the difference, within a token budget per step. A request whose computed tokens reach
``num_tokens`` in a step samples its next token in that step (a decode is a 1-token chunk).

Priority is arrival order (``arrival_time``, then order of ``add``). Running requests are
scheduled first, oldest first; when pages run out, the newest running request is preempted: its
pages are freed (full ones stay in the prefix cache, so recomputing is mostly cache hits), its
outputs are kept, and it waits ahead of every newer request to recompute prompt + outputs. The
victim is never a request already scheduled in this step, so no step reads a freed page.
Waiting requests are admitted in order while the step's budget, ``max_num_seqs`` and free pages
allow; a chunk never ends inside an image's placeholder span (its tokens attend to each other
bidirectionally, so the span's K/V are right only when the whole rest of it is computed together):
it ends before the span instead, or the request waits a step for budget; one that would recompute a prefix another running request is computing right now waits a
step and then takes it from the cache (so a batch sharing a system prompt computes it once).

Not thread-safe: the engine loop calls every method, including ``cancel`` on behalf of clients.
A cancel between ``schedule`` and ``update`` is safe: its pages are only reused by a later
``schedule``, after the runner has finished the step.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Callable, Mapping

from serve.kv_pages import KVCacheManager
from serve.request import FinishReason, Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """One request's work in a step.

    Attributes:
      request_id: the request.
      token_ids: the tokens to compute, a prefill chunk or the one decode token.
      start_position: position of ``token_ids[0]``; the tokens are at
        ``start_position + arange(len(token_ids))``.
      page_tables: per page group, the physical pages of logical pages ``0 .. ceil(end / G) - 1``
        (``NULL_PAGE`` where a sliding group released one); the K/V of ``token_ids`` go to slot
        ``pos % G`` of page ``page_tables[g][pos // G]``.
      samples: whether this step yields a sampled token for the request (its last prefill chunk or
        a decode).
      request: the request itself, for sampling parameters and the history penalties need.
      num_lookahead: K/V slots reserved after ``token_ids`` for draft tokens (speculative
        decoding: a decode whose request set ``num_lookahead_tokens``); the runner fills up to
        this many drafts, verifies them and returns the committed tokens.
      sample_offset: the sampled token's index past ``request.num_output_tokens`` (a draft
        model's later steps sample tokens 1, 2, ... ahead; it keys the sampler's RNG).
      prev_token_id: the token before ``token_ids[0]`` where the request's history does not hold
        it (a draft model's look-ahead feeds its own drafts); None: read it from the history.
        Token-shift models (``ModelConfig.token_shift``) take it as input.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    page_tables: tuple[tuple[int, ...], ...]
    samples: bool
    request: Request = dataclasses.field(repr=False, compare=False)
    num_lookahead: int = 0
    sample_offset: int = 0
    prev_token_id: int | None = None

    @property
    def page_table(self) -> tuple[int, ...]:
        """The first group's page table (the only one for an all-global model)."""
        return self.page_tables[0]


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What the runner computes in one step.

    Attributes:
      scheduled: the requests of this step, oldest first.
      num_scheduled_tokens: sum of ``len(token_ids)``.
      preempted_request_ids: preempted in this step (their K/V must not be read again).
      finished_request_ids: finished since the previous step for any reason (the runner drops
        per-request state).
      expired: requests this call finished because their deadline passed (the engine reports
        them; requests finished by ``update`` or ``abort`` were reported there).
    """

    scheduled: tuple[ScheduledRequest, ...]
    num_scheduled_tokens: int
    preempted_request_ids: tuple[str, ...] = ()
    finished_request_ids: tuple[str, ...] = ()
    expired: tuple[Request, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One sampled token, after stop checks."""

    request: Request
    token_id: int
    finished: bool


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's counters."""

    num_waiting: int
    num_running: int
    num_preemptions: int
    num_computed_tokens: int  # computed by the runner, all requests, recomputes included
    pages_in_use: tuple[int, ...]  # per page group
    pages_free: tuple[int, ...]
    prefix_queries: int  # tokens looked up at admissions
    prefix_hits: int  # of those, tokens found in the cache


def chunk_within_spans(request: Request, start: int, n: int) -> int:
    """The largest chunk of at most ``n`` tokens from ``start`` that does not end inside an image
    span; 0 when the chunk starts inside (or at) a span whose rest does not fit in ``n``.

    A chunk may start inside a span: the span's earlier tokens then came from the prefix cache,
    computed with the same image (the page keys hold its content hash) and so with the whole span.
    """
    end = start + n
    for span in request.mm_spans:
        lo, hi = span.offset, span.offset + span.length
        if lo < end < hi:
            return max(lo - start, 0)
    return n


class Scheduler:
    """Decides, each step, which tokens of which requests the runner computes.

    Args:
      kv_manager: the page tables and pools.
      max_num_seqs: most running requests.
      max_num_batched_tokens: token budget of one step.
      prefill_chunk_size: most tokens of one request in a step (long prompts prefill in chunks);
        defaults to ``max_num_batched_tokens``.
      defer_shared_prefixes: hold back a waiting request whose next page another running request
        is computing, so it takes that page from the cache instead of recomputing it.
      clock: time source for arrival times and deadlines.
    """

    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_size: int | None = None,
        *,
        defer_shared_prefixes: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        chunk = max_num_batched_tokens if prefill_chunk_size is None else prefill_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"prefill_chunk_size must be an int >= 1, got {prefill_chunk_size!r}")
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_size = min(chunk, max_num_batched_tokens)
        self.defer_shared_prefixes = defer_shared_prefixes
        self.clock = clock
        self._requests: dict[str, Request] = {}
        self._waiting: list[tuple[tuple[float, int], Request]] = []  # sorted by priority key
        self._running: list[tuple[tuple[float, int], Request]] = []
        self._order: dict[str, tuple[float, int]] = {}
        self._seq = 0
        self._finished_ids: list[str] = []
        self._pending: SchedulerOutput | None = None
        self.num_preemptions = 0
        self.num_computed_tokens = 0

    # ------------------------------------------------------------------ queues

    def add(self, request: Request) -> None:
        """Queues a new request.

        Raises:
          ValueError: the id is live already, the request is not fresh, or it could never fit in
            the KV pool (prompt + max_tokens - 1 tokens need more pages than exist).
        """
        if not isinstance(request, Request):
            raise ValueError(f"add() takes a Request, got {type(request).__name__}")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already queued or running")
        if request.status != RequestStatus.WAITING or request.output_token_ids or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} was already scheduled once; add a new Request")
        for span in request.mm_spans:
            if span.length > self.prefill_chunk_size:
                raise ValueError(
                    f"request {request.request_id!r}: an image of {span.length} tokens does not fit one "
                    f"prefill chunk of {self.prefill_chunk_size} tokens (its span must be computed at once)")
        # The last sampled token is never fed back, so it needs no K/V slot.
        lifetime = request.num_prompt_tokens + request.params.max_tokens - 1
        need = self.kv.required_pages(lifetime, self.prefill_chunk_size)
        for g, (n, group) in enumerate(zip(need, self.kv.groups)):
            if n > group.pool.num_pages:
                raise ValueError(
                    f"request {request.request_id!r}: a prompt of {request.num_prompt_tokens} tokens plus "
                    f"max_tokens={request.params.max_tokens} needs {n} KV pages of {self.kv.page_size} tokens "
                    f"(group {g}) but the pool has only {group.pool.num_pages}"
                )
        if request.arrival_time is None:
            request.arrival_time = self.clock()
        key = (request.arrival_time, self._seq)
        self._seq += 1
        self._order[request.request_id] = key
        self._requests[request.request_id] = request
        bisect.insort(self._waiting, (key, request), key=lambda e: e[0])

    def get(self, request_id: str) -> Request | None:
        """The live (unfinished) request with this id, or ``None``."""
        return self._requests.get(request_id)

    @property
    def waiting(self) -> list[Request]:
        """Waiting and preempted requests, in admission order."""
        return [r for _, r in self._waiting]

    @property
    def running(self) -> list[Request]:
        """Running requests, oldest first."""
        return [r for _, r in self._running]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def cancel(self, request_id: str) -> Request | None:
        """Finishes a request with ``cancelled`` and frees all its pages at once.

        Returns:
          The request, or ``None`` if no live request has this id (finished already: not an error).
        """
        return self.abort(request_id, FinishReason.CANCELLED)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ERROR) -> Request | None:
        """Finishes a live request with ``reason``, wherever it is; see ``cancel``."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._remove(request)
        self._finish(request, FinishReason(reason))
        return request

    # ------------------------------------------------------------------ the step

    def schedule(self) -> SchedulerOutput:
        """Chooses this step's work; see the module docstring for the policy.

        Raises:
          RuntimeError: the previous output has not been passed to ``update`` yet.
        """
        if self._pending is not None:
            raise RuntimeError("schedule() called twice without update(); pass each output to update() first")
        expired = self._expire(self.clock())
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i][1]
            n = min(request.num_tokens - request.num_computed_tokens, self.prefill_chunk_size, budget)
            assert n > 0, f"running request {request.request_id!r} has nothing to compute"
            n = chunk_within_spans(request, request.num_computed_tokens, n)
            if n == 0:  # the rest of an image span needs more budget than this step has left
                i += 1
                continue
            lookahead = 0
            if request.num_tokens - request.num_computed_tokens == 1:  # a decode: room for drafts?
                lookahead = max(0, min(request.num_lookahead_tokens, budget - 1))
            n += lookahead
            tables = self.kv.allocate_slots(request, n)
            while tables is None:
                victim = self._running.pop()[1]  # newest; never one scheduled earlier in this step
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                tables = self.kv.allocate_slots(request, n)
            if tables is None:
                break  # the request preempted itself; it was the last running one
            scheduled.append(self._entry(request, n - lookahead, tables, lookahead))
            budget -= n
            i += 1

        if not preempted:  # pages are short if anything was preempted; admitting would thrash
            budget = self._admit(budget, scheduled)

        out = SchedulerOutput(
            scheduled=tuple(scheduled),
            num_scheduled_tokens=self.max_num_batched_tokens - budget,
            preempted_request_ids=tuple(preempted),
            finished_request_ids=tuple(self._finished_ids),
            expired=tuple(expired),
        )
        self._finished_ids = []
        self._pending = out
        return out

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        defer = self.defer_shared_prefixes and self.kv.enable_prefix_caching
        inflight = self._inflight_keys() if defer else set()
        j = 0
        while j < len(self._waiting) and budget > 0 and len(self._running) < self.max_num_seqs:
            request = self._waiting[j][1]
            hit = self.kv.get_computed_pages(request)
            G = self.kv.page_size
            next_page = hit.num_tokens // G
            if inflight and next_page < len(request.page_hashes) and request.page_hashes[next_page] in inflight:
                j += 1  # another request is computing this page now; take it from the cache later
                continue
            n = min(request.num_tokens - hit.num_tokens, self.prefill_chunk_size, budget)
            n = chunk_within_spans(request, hit.num_tokens, n)
            if n == 0:
                break  # its image span needs more budget than this step has left; next step
            tables = self.kv.allocate_slots(request, n, hit)
            if tables is None:
                break  # first come, first served: nobody overtakes a request short of pages
            del self._waiting[j]
            request.num_computed_tokens = hit.num_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
                request.num_cached_tokens = hit.num_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, (self._order[request.request_id], request), key=lambda e: e[0])
            scheduled.append(self._entry(request, n, tables))
            budget -= n
            if defer:
                inflight.update(self._uncomputed_keys(request, hit.num_tokens))
        return budget

    def _uncomputed_keys(self, request: Request, computed: int) -> list[bytes]:
        G = self.kv.page_size
        n_full = (request.num_tokens - 1) // G
        self.kv.page_hashes(request, n_full)
        return request.page_hashes[computed // G : n_full]

    def _inflight_keys(self) -> set[bytes]:
        keys: set[bytes] = set()
        for _, r in self._running:
            if r.num_tokens - r.num_computed_tokens > 1:  # still prefilling
                keys.update(self._uncomputed_keys(r, r.num_computed_tokens))
        return keys

    def _entry(self, request: Request, n: int, tables, lookahead: int = 0) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=tuple(request.token_slice(start, start + n)),
            start_position=start,
            page_tables=tuple(tuple(t) for t in tables),
            samples=start + n == request.num_tokens,
            request=request,
            num_lookahead=lookahead,
        )

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[StepResult]:
        """Records a step: advances computed tokens, caches full pages, appends sampled tokens.

        Requests cancelled or aborted while the step ran are skipped (after a runner failure the
        engine aborts the step's requests and calls ``update(output, {})``).

        Args:
          output: the output of the last ``schedule()``.
          sampled: the sampled token per request id, for every entry with ``samples=True``; for
            an entry with ``num_lookahead`` a sequence of 1 .. num_lookahead + 1 committed tokens
            (accepted drafts, then the target's own token).

        Returns:
          One result per sampled token, in schedule order; finished requests have freed their
          pages and left the scheduler.
        """
        if output is not self._pending:
            raise RuntimeError("update() must get the output of the latest schedule() call, once")
        self._pending = None
        now = self.clock()
        results = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue
            n = len(item.token_ids) + item.num_lookahead
            request.total_computed_tokens += n
            self.num_computed_tokens += n
            if not item.samples:
                request.num_computed_tokens += n
                self.kv.cache_full_pages(request)
                continue
            if item.request_id not in sampled:
                raise ValueError(f"update(): no sampled token for request {item.request_id!r}")
            tokens = self._committed(item, sampled[item.request_id])
            reason = None
            for token in tokens:
                request.output_token_ids.append(token)
                if token in request.params.stop_token_ids:
                    reason = FinishReason.STOP
                elif request.num_output_tokens >= request.params.max_tokens:
                    reason = FinishReason.LENGTH
                elif request.deadline is not None and now >= request.deadline:
                    reason = FinishReason.DEADLINE
                results.append(StepResult(request, token, reason is not None))
                if reason is not None:
                    break
            # The K/V of every committed token but the newest is in the cache now: the fed token
            # plus the accepted drafts. Slots written for rejected drafts are rolled back.
            committed = request.num_output_tokens - (item.start_position + len(item.token_ids)
                                                     - request.num_prompt_tokens)
            request.num_computed_tokens += len(item.token_ids) + committed - 1
            if item.num_lookahead:
                self.kv.truncate(request, request.num_computed_tokens)
            self.kv.cache_full_pages(request)
            if reason is not None:
                self._remove(request)
                self._finish(request, reason, now)
        return results

    @staticmethod
    def _committed(item: ScheduledRequest, value) -> list[int]:
        """The sampled token(s) of an entry, checked: one int, or 1 .. num_lookahead + 1 of them."""
        rid = item.request_id
        tokens = [value] if not item.num_lookahead and not isinstance(value, (list, tuple)) else value
        if not isinstance(tokens, (list, tuple)) or not 1 <= len(tokens) <= item.num_lookahead + 1:
            raise ValueError(f"update(): request {rid!r} needs 1 to {item.num_lookahead + 1} sampled "
                             f"tokens, got {value!r}")
        for token in tokens:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"update(): sampled token for {rid!r} must be an int >= 0, got {token!r}")
        return list(tokens)

    # ------------------------------------------------------------------ internals

    def _expire(self, now: float) -> list[Request]:
        expired = [r for r in self._requests.values() if r.deadline is not None and now >= r.deadline]
        for r in expired:
            self._remove(r)
            self._finish(r, FinishReason.DEADLINE, now)
        return expired

    def _remove(self, request: Request) -> None:
        queue = self._running if request.status == RequestStatus.RUNNING else self._waiting
        key = self._order[request.request_id]
        k = bisect.bisect_left(queue, key, key=lambda e: e[0])
        assert queue[k][1] is request
        del queue[k]

    def _finish(self, request: Request, reason: FinishReason, now: float | None = None) -> None:
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = self.clock() if now is None else now
        del self._requests[request.request_id]
        del self._order[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self._waiting, (self._order[request.request_id], request), key=lambda e: e[0])

    def stats(self) -> SchedulerStats:
        pools = [g.pool for g in self.kv.groups]
        return SchedulerStats(
            num_waiting=len(self._waiting),
            num_running=len(self._running),
            num_preemptions=self.num_preemptions,
            num_computed_tokens=self.num_computed_tokens,
            pages_in_use=tuple(p.num_used for p in pools),
            pages_free=tuple(p.num_free for p in pools),
            prefix_queries=self.kv.stats.queries,
            prefix_hits=self.kv.stats.hits,
        )
