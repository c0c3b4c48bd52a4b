"""The serving engine: requests in, typed event streams out, one scheduler + runner loop between.

    engine = Engine(model, tokenizer, num_pages=512, page_size=16, max_num_seqs=32,
                    max_num_batched_tokens=512)
    engine.start()                                   # or drive engine.step() by hand (tests)
    handle = engine.submit(EngineRequest(messages=[{"role": "user", "content": "hi"}]))
    for event in handle: ...                         # ReasoningDelta, AnswerDelta, ..., Finished
    async for event in handle.events_async(): ...    # the same from asyncio code
    engine.stop()

Every check happens in ``submit``, in the caller's thread, before anything is queued: the channel
spec (tools, tool_choice, response_format, effort), the prompt against the model's context and the
KV pool, an unknown ``previous_response_id``. The loop (``step``) then runs
``scheduler.schedule() -> runner.execute() -> scheduler.update()`` and feeds each sampled token to
its request's channel machine, whose bitmask constrained that very token. Only the loop thread
touches the scheduler: ``submit`` and ``cancel`` post to an inbox that each step drains first.

Requests with ``channels=False`` skip the channel machine: no mask, and their text streams as
``AnswerDelta`` (used by raw token clients, tests and the batch path's parity checks).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from model.image_processing import ImageLimits
from model.quantization import check_kv_cache_dtype
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from serve import events as ev
from serve.channel import ChannelMachine, ChannelSpec, State, fill_masks
from serve.conversation import ResponseStore, StoredResponse
from serve.effort import EffortModel
from serve.grammar import IM_END, ChannelVocab, FunctionTool
from serve.image_prompt import decode_images, expand_images, split_image_parts
from serve.kv_pages import KVCacheManager
from serve.request import FinishReason, Request, SamplingParams
from serve.runner import ModelRunner, SampleOutput, VerifyOutput
from serve.scheduler import Scheduler
from serve.speculative import AcceptanceMonitor, SpeculativeConfig, build_proposer, spec_usage_fields

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One generation request as the API layer hands it over.

    Attributes:
      messages: OpenAI-style chat messages, rendered with the tokenizer's chat template; a user
        message's content may be a list of ``{"type": "text", "text": ...}`` and
        ``{"type": "image", "image": <encoded bytes>}`` parts (models with a vision tower); or
      prompt_token_ids: the prompt as token ids (exactly one of the two; with
        ``previous_response_id`` they are the new turn, appended to the stored one's tokens).
      tools: functions offered (``FunctionTool`` or OpenAI ``{"type": "function", "function":
        {name, description, parameters}}`` dicts).
      tool_choice, parallel_tool_calls, response_format, effort, reasoning_budget: see
        ``serve.channel.ChannelSpec``.
      params: sampling parameters (``max_tokens`` is cut to what the context leaves).
      previous_response_id: continue a stored response (its tokens become the prompt's prefix).
      store: keep the finished response for later ``previous_response_id`` use.
      deadline: seconds from submission after which the request finishes with ``deadline``.
      request_id: the id (default: a fresh ``resp_...``); also the stored response id.
      channels: False: raw token generation, no channel machine or mask.
      cache_salt: isolates prefix-cache sharing and encoded-image reuse (e.g. per tenant).
      chat_kwargs: extra chat-template variables (e.g. ``enable_thinking``). ``reasoning_effort``
        defaults to `effort` (but ``none``), the hint of templates trained to heed it.
      images: encoded images for a ``prompt_token_ids`` prompt, one per image-start token in it.
      strict_max_tokens: the caller chose ``max_tokens``: a prompt plus ``max_tokens`` beyond
        the context is an error (as in vLLM and OpenAI's chat API) instead of ``max_tokens``
        being cut to what the context leaves.
      speculative: False: decode without drafts even when the engine speculates.
    """

    messages: Sequence[Mapping[str, Any]] | None = None
    prompt_token_ids: Sequence[int] | None = None
    tools: Sequence[FunctionTool | Mapping[str, Any]] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    response_format: Mapping[str, Any] | None = None
    effort: str = "medium"
    reasoning_budget: int | None = None
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    previous_response_id: str | None = None
    store: bool = True
    deadline: float | None = None
    request_id: str | None = None
    channels: bool = True
    cache_salt: str | None = None
    chat_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    images: Sequence[bytes] = ()
    strict_max_tokens: bool = False
    speculative: bool = True


class RequestHandle:
    """A request's event stream and its result, filled by the engine loop.

    Iterate it (blocking) or ``events_async()`` (asyncio) for the typed events; ``Finished`` is
    always last. ``events``, ``output_token_ids`` and ``logprobs`` keep everything seen so far.
    """

    def __init__(self, request_id: str, prompt_token_ids: tuple[int, ...]):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.events: list[ev.Event] = []
        self.output_token_ids: list[int] = []
        self.logprobs: list[SampleOutput] = []
        self.usage: ev.Usage | None = None
        self.finish_reason: str | None = None
        # The reasoning budget (an effort="auto" request's from the probe once prefilled); None
        # without reasoning or channels.
        self.reasoning_budget: int | None = None
        self.effort: str | None = None  # the effort served (for effort="auto", the router's choice)
        self.request: Request | None = None
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _push(self, events: list[ev.Event]) -> None:
        for e in events:
            self.events.append(e)
            self._queue.put(e)
            if isinstance(e, ev.Finished):
                self.usage, self.finish_reason = e.usage, e.reason
                self._done.set()

    def __iter__(self) -> Iterator[ev.Event]:
        while True:
            e = self._queue.get()
            yield e
            if isinstance(e, ev.Finished):
                return

    async def events_async(self):
        """The events for asyncio code (each wait runs in a worker thread, never the loop)."""
        while True:
            e = await asyncio.to_thread(self._queue.get)
            yield e
            if isinstance(e, ev.Finished):
                return

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until ``Finished`` (with a running engine); returns whether it came."""
        return self._done.wait(timeout)

    def text(self, kind: type = ev.AnswerDelta) -> str:
        """The concatenated deltas of one channel so far (answer by default)."""
        return "".join(e.text for e in self.events if isinstance(e, kind))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters for metrics."""

    num_waiting: int
    num_running: int
    pages_in_use: tuple[int, ...]
    pages_free: tuple[int, ...]
    prefix_hit_rate: float
    num_preemptions: int
    num_computed_tokens: int
    num_output_tokens: int
    output_tokens_per_s: float  # over the engine's busy time
    mask_seconds: float  # host time spent computing channel masks
    step_seconds: float  # busy time of the loop
    num_stored_responses: int
    num_draft_tokens: int = 0  # speculative decoding: drafts verified
    num_accepted_tokens: int = 0  # of those, accepted into outputs


@dataclasses.dataclass
class _Live:
    request: Request
    handle: RequestHandle
    machine: ChannelMachine | None
    decoder: Any
    messages: tuple | None
    tools: tuple
    store: bool
    prompt_recorded: bool = False
    speculate: bool = False  # speculative decoding allowed for this request
    num_drafted: int = 0
    num_accepted: int = 0
    # Samples of answer tokens whose text no AnswerDelta has carried yet (logprobs requests).
    pending_logprobs: list = dataclasses.field(default_factory=list)


class Engine:
    """Continuous-batching generation over a paged KV cache.

    Args:
      model: the Transformer to serve.
      tokenizer: its tokenizer (chat template, detokenizing, the channel vocabulary); may be
        ``None`` for raw token requests only.
      num_pages: KV pages per layer group (the global one).
      page_size: tokens per page (G).
      max_num_seqs: most requests running at once.
      max_num_batched_tokens: tokens computed per step (prefill chunks plus decodes).
      prefill_chunk_size: most tokens of one request per step.
      num_sliding_pages: pages of the sliding-window group (default: ``num_pages``).
      enable_prefix_caching: share full pages across requests with equal prefixes.
      max_stored_responses: bound of the response store (LRU).
      attn_impl: attention implementation for the runner.
      kv_cache_dtype: ``auto`` (the model's compute dtype) or ``int8`` (int8 pages with one scale
        per page and kv head, ``model/kv_int8.py``); vLLM's ``--kv-cache-dtype``.
      seed: seeds the engine RNG that seeds requests without a ``seed``.
      vocab: the channel vocabulary (default: built from ``tokenizer``).
      effort: the effort model (budgets per effort, optional probe).
      speculative: speculative decoding (prompt lookup or a draft model); None: off.
      clock: time source (deadlines, rates).
      image_limits: what one image may cost before it is decoded (bytes, pixels, frames).
      max_images_per_request: most images in one request (a continued conversation's included).
      max_model_len: most tokens of one sequence, prompt plus output (vLLM's name; default: the
        model's ``max_position_embeddings``). When given, the engine refuses to start unless one
        sequence of that length fits the KV pools, and says by how many pages it does not.
      kv_cache_dtype: dtype of the KV pages (default: the model's compute dtype).
      early_exit_threshold: early-exit decoding (models with ``exit_layers``; see
        ``ModelRunner``); ``None``: off.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, num_pages: int,
                 page_size: int = 16, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 prefill_chunk_size: int | None = None, num_sliding_pages: int | None = None,
                 enable_prefix_caching: bool = True, max_stored_responses: int = 1024,
                 attn_impl: str = "auto", seed: int = 0, vocab: ChannelVocab | None = None,
                 effort: EffortModel | None = None, clock: Callable[[], float] = time.monotonic,
                 image_limits: ImageLimits | None = None, max_images_per_request: int = 8,
                 max_model_len: int | None = None, kv_cache_dtype: str | None = None,
                 speculative: SpeculativeConfig | None = None,
                 early_exit_threshold: float | None = None):
        cfg = model.config
        kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)  # before any page is allocated
        if max_model_len is not None:
            if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
                raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
            if max_model_len > cfg.max_position_embeddings:
                raise ValueError(f"max_model_len {max_model_len:,} exceeds the model's "
                                 f"max_position_embeddings ({cfg.max_position_embeddings:,})")
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.effort = effort or EffortModel()
        self.config = cfg
        self.tokenizer = tokenizer
        self.clock = clock
        self.kv = KVCacheManager.for_layers(cfg.layer_types, cfg.sliding_window, num_pages=num_pages,
                                            page_size=page_size, num_sliding_pages=num_sliding_pages,
                                            enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, prefill_chunk_size,
                                   clock=clock)
        if max_model_len is not None:
            self._check_pools_hold(max_model_len)
        self.runner = ModelRunner(model, self.kv, attn_impl=attn_impl, cache_dtype=None if kv_cache_dtype == "auto" else kv_cache_dtype,
                                  early_exit_threshold=early_exit_threshold)
        self.image_limits = image_limits or ImageLimits()
        self.max_images_per_request = max_images_per_request
        self.speculative = speculative
        self.acceptance = None
        if speculative is not None:  # a draft with another tokenizer is refused here
            self.runner.proposer = build_proposer(speculative, target=model, target_tokenizer=tokenizer,
                                                  kv=self.kv, attn_impl=attn_impl)
            self.acceptance = AcceptanceMonitor(speculative)
        self.num_steps = 0
        self.responses = ResponseStore(max_stored_responses)
        self._vocab = vocab
        self._rng = np.random.default_rng(seed)
        self._inbox: collections.deque = collections.deque()
        self._live: dict[str, _Live] = {}
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.num_output_tokens = 0
        self.mask_seconds = 0.0
        self.step_seconds = 0.0

    def _check_pools_hold(self, max_model_len: int) -> None:
        """Refuses (before any K/V is allocated) a pool that cannot hold one full-length sequence."""
        need = self.kv.required_pages(max_model_len - 1, self.scheduler.prefill_chunk_size)
        for n, group in zip(need, self.kv.groups):
            have = group.pool.num_pages
            if n > have:
                kind = "global" if group.window is None else f"sliding (window {group.window:,})"
                # Every group holds ceil((len - 1) / G) pages while that is under its window's cap.
                fits = have * self.kv.page_size + 1
                raise ValueError(
                    f"max_model_len {max_model_len:,} does not fit the KV cache: one sequence needs "
                    f"{n:,} pages of {self.kv.page_size} tokens in the {kind} group "
                    f"({self.config.layer_types.count('global' if group.window is None else 'sliding')} "
                    f"layer(s)), but its pool has {have:,} pages; give at "
                    f"least {n:,} pages or a max_model_len of at most {fits:,}")

    # ------------------------------------------------------------------ submission

    @property
    def vocab(self) -> ChannelVocab:
        """The channel vocabulary, built on first use from the tokenizer."""
        if self._vocab is None:
            tok = self.tokenizer
            if tok is None:
                raise ValueError("channel requests need a tokenizer; pass one or use channels=False")
            self._vocab = ChannelVocab.from_token_bytes(
                tok.token_bytes(), tok.special_ids, tok.encode, vocab_size=self.config.vocab_size,
                eos_ids=sorted(tok.stop_ids))
        return self._vocab

    def submit(self, req: EngineRequest) -> RequestHandle:
        """Checks and queues a request.

        Returns:
          Its handle.

        Raises:
          ValueError: anything wrong with the request (nothing was queued).
        """
        if not isinstance(req, EngineRequest):
            raise ValueError(f"submit() takes an EngineRequest, got {type(req).__name__}")
        if (req.messages is None) == (req.prompt_token_ids is None):
            raise ValueError("give exactly one of messages and prompt_token_ids")
        rid = req.request_id or f"resp_{uuid.uuid4().hex[:24]}"
        if rid in self._live or any(item[1] == rid for item in list(self._inbox) if item[0] == "add"):
            raise ValueError(f"request id {rid!r} is already in flight")
        tools = tuple(_function_tool(t) for t in req.tools)
        spec = None
        if req.channels and req.effort == "auto" and req.reasoning_budget is None:
            # A router (a model that heeds the effort hint) picks the effort from the last user
            # message before the prompt is rendered: its hint and its budget serve the request.
            routed = self.effort.route(self._conversation_messages(req))
            if routed is not None and routed != "auto":
                req = dataclasses.replace(req, effort=routed)
        # effort="auto": the probe sets the budget from the prompt's last hidden state after
        # prefill; a model without a probe reasons at its medium budget.
        predict = req.channels and req.effort == "auto" and req.reasoning_budget is None
        budget = req.reasoning_budget
        if predict and self.effort.probe is None:
            predict, budget = False, self.effort.budgets["medium"]
        if req.channels:
            spec = ChannelSpec(tools=tools, tool_choice=req.tool_choice,
                               parallel_tool_calls=req.parallel_tool_calls,
                               response_format=req.response_format, effort=req.effort,
                               reasoning_budget=budget, effort_budgets=self.effort.budgets)
        tool_schemas = tuple(_tool_schema(t) for t in tools)
        prompt, messages, spans, inputs = self._prompt(req, tool_schemas)
        context = self.max_model_len
        if len(prompt) >= context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {context} "
                             f"tokens, which leaves no room for output")
        if req.strict_max_tokens and len(prompt) + req.params.max_tokens > context:
            raise ValueError(f"the model's context is {context:,} tokens, but the prompt has "
                             f"{len(prompt):,} and max_tokens asks for {req.params.max_tokens:,} more "
                             f"({len(prompt) + req.params.max_tokens:,} in all); lower max_tokens to "
                             f"{context - len(prompt):,} or shorten the prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        params = req.params
        changes: dict[str, Any] = {}
        if params.max_tokens > context - len(prompt):
            changes["max_tokens"] = context - len(prompt)
        if params.seed is None:
            changes["seed"] = int(self._rng.integers(0, 2**31))
        if spec is not None:
            changes["stop_token_ids"] = tuple(sorted(set(params.stop_token_ids) | set(self.vocab.eos_ids)))
        if changes:
            params = dataclasses.replace(params, **changes)
        deadline = None if req.deadline is None else self.clock() + float(req.deadline)
        request = Request(rid, prompt, params, deadline=deadline, cache_salt=req.cache_salt,
                          wants_hidden=predict, mm_spans=spans, mm_inputs=inputs)
        for span in spans:
            if span.length > self.scheduler.prefill_chunk_size:
                raise ValueError(f"an image takes {span.length} tokens, more than the prefill chunk of "
                                 f"{self.scheduler.prefill_chunk_size} tokens")
        lifetime = len(prompt) + params.max_tokens - 1
        need = self.kv.required_pages(lifetime, self.scheduler.prefill_chunk_size)
        for n, group in zip(need, self.kv.groups):
            if n > group.pool.num_pages:
                raise ValueError(f"a prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} "
                                 f"needs {n} KV pages of {self.kv.page_size} tokens; the pool has "
                                 f"{group.pool.num_pages}")
        machine = ChannelMachine(self.vocab, spec, input_tokens=len(prompt)) if spec is not None else None
        decoder = None
        if machine is None and self.tokenizer is not None:
            decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        handle = RequestHandle(rid, prompt)
        handle.request = request
        handle.effort = req.effort if req.channels else None
        if spec is not None and not predict:
            handle.reasoning_budget = spec.budget
        live = _Live(request, handle, machine, decoder, messages, tool_schemas, req.store)
        # Penalties change along the draft and logprobs would be needed at every position: such
        # requests decode one token at a time (documented in serve.speculative).
        live.speculate = bool(req.speculative) and self.speculative is not None and not (
            params.logprobs or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)
        with self._wake:
            self._inbox.append(("add", rid, live))
            self._wake.notify()
        return handle

    def _conversation_messages(self, req: EngineRequest) -> list:
        """The messages of the conversation a request continues (a stored turn's) and its own."""
        if req.messages is None:
            return []
        prev = self.responses.get(req.previous_response_id) if req.previous_response_id else None
        return list(prev.messages or ()) + list(req.messages) if prev is not None else list(req.messages)

    def _prompt(self, req: EngineRequest, tool_schemas):
        """(prompt ids, messages or None, image spans, image inputs) of a request."""
        prev = None
        if req.previous_response_id is not None:
            prev = self.responses.get(req.previous_response_id)
            if prev is None:
                raise ValueError(f"previous_response_id {req.previous_response_id!r} is unknown or was evicted")
        head, new, messages, raw_images = self._new_tokens(req, tool_schemas, prev)
        spans, inputs = (prev.mm_spans, prev.mm_inputs) if prev is not None else ((), ())
        if raw_images:
            vision = self.config.vision
            if len(raw_images) + len(spans) > self.max_images_per_request:
                raise ValueError(f"the request has {len(raw_images) + len(spans)} images; the limit is "
                                 f"{self.max_images_per_request} per request (a continued "
                                 "conversation's images count)")
            images = decode_images(raw_images, vision, self.image_limits, self.max_images_per_request)
            new, new_spans = expand_images(new, images, vision, offset=len(head))
            spans = tuple(spans) + new_spans
            inputs = tuple(inputs) + tuple(i.pixels for i in images)
        elif self.config.vision is not None and self.config.vision.image_token_id in new:
            raise ValueError("the prompt contains the image placeholder token but no image")
        return head + tuple(new), messages, tuple(spans), tuple(inputs)

    @property
    def takes_images(self) -> bool:
        """Whether chat messages may hold images (a vision tower, an image-start token, a tokenizer)."""
        return self._image_marker() is not None

    def _image_marker(self) -> str | None:
        """The text of the image-start token, or None when the model takes no images."""
        vision = self.config.vision
        if vision is None or vision.image_start_id is None or self.tokenizer is None:
            return None
        return self.tokenizer.decode([vision.image_start_id])

    def _new_tokens(self, req: EngineRequest, tool_schemas, prev):
        """(tokens kept from ``prev``, the new tokens, messages or None, the new images' bytes)."""
        if req.prompt_token_ids is not None:
            ids = tuple(req.prompt_token_ids)
            if not ids:
                raise ValueError("prompt_token_ids is empty")
            images = list(req.images)
            if images and (self.config.vision is None or self.config.vision.image_start_id is None):
                raise ValueError("images were given but this model does not take images")
            return (prev.token_ids if prev else ()), ids, None, images
        if req.images:
            raise ValueError("images go inside messages (content parts); EngineRequest.images is for "
                             "prompt_token_ids prompts")
        if self.tokenizer is None:
            raise ValueError("messages need a tokenizer with a chat template")
        new, images = split_image_parts(req.messages, self._image_marker())
        if not new:
            raise ValueError("messages is empty")
        tools = list(tool_schemas) or None
        template = self.tokenizer.chat_template
        if tools and template is not None and not template.shows_tools:
            raise ValueError("this model's chat template does not show tools to the model (it ignores "
                             "the `tools` list), so it could never see the functions offered; serve a "
                             "model whose template renders tools, or describe the functions in a system "
                             "message and send the request without `tools`")
        kw = dict(req.chat_kwargs)
        if req.channels and req.effort != "none":
            # The template hint (vLLM's and SGLang's way to pass an effort): a template trained
            # with it says the effort in the system turn; others read no such variable.
            kw.setdefault("reasoning_effort", req.effort)
        if prev is None or prev.messages is None:
            text = self.tokenizer.render_chat(new, tools=tools, add_generation_prompt=True, **kw)
            head = prev.token_ids if prev else ()
            return head, tuple(self.tokenizer.encode(text)), tuple(new), images
        # Continue the stored turn token for token: the new messages rendered as what follows it.
        before = list(prev.messages)
        suffix = self._continuation(before, new, tools, kw)
        head = prev.token_ids
        im_end = self.vocab.tag_ids[IM_END]
        if not head or head[-1] not in self.vocab.eos_ids:
            head = head + (im_end,)  # the turn was cut short: close it
        return head, tuple(self.tokenizer.encode(suffix)), tuple(before + new), images

    def _continuation(self, before: list[dict], new: list[dict], tools, kw) -> str:
        """The text the chat template writes for `new` after the stored turns `before`.

        The stored turns end in ``<|im_end|>``; the continuation is what the template writes for
        the whole conversation after as many ``<|im_end|>`` as the stored turns have. Counting
        turn ends instead of comparing prefixes matters: templates rewrite earlier turns once a
        later user turn exists (Qwen3 drops their reasoning and empty think blocks), and the
        stored tokens keep what the model really wrote. So the new turns are written exactly as
        mid-conversation turns: no second system block, no repeated tools header.
        """
        render = self.tokenizer.render_chat
        turns = render(before, tools=tools, add_generation_prompt=False, **kw).count(IM_END)
        parts = render(before + new, tools=tools, add_generation_prompt=True, **kw).split(IM_END)
        if turns == 0 or len(parts) <= turns:
            raise ValueError("the chat template cannot continue a stored conversation: its turns "
                             f"do not end in {IM_END}")
        return IM_END.join(parts[turns:])

    def cancel(self, request_id: str) -> None:
        """Cancels a request (its stream ends with ``Finished("cancelled")``); unknown ids are ignored."""
        with self._wake:
            self._inbox.append(("cancel", request_id, None))
            self._wake.notify()

    def get_response(self, response_id: str) -> StoredResponse | None:
        return self.responses.get(response_id)

    def delete_response(self, response_id: str) -> bool:
        return self.responses.delete(response_id)

    # ------------------------------------------------------------------ the loop

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

    def step(self) -> bool:
        """Runs one scheduler + runner step; returns whether there was anything to do."""
        with self._step_lock:
            t0 = time.perf_counter()
            self._drain_inbox()
            if not self.scheduler.has_unfinished():
                return False
            self._plan_drafts()
            out = self.scheduler.schedule()
            self.num_steps += 1
            for r in out.expired:
                self._end(r.request_id, FinishReason.DEADLINE.value)
            masks = self._masks(out)
            try:
                sampled = self.runner.execute(out, masks)
            except Exception:
                log.exception("model step failed; aborting its requests")
                for e in out.scheduled:
                    if self.scheduler.abort(e.request_id) is not None:
                        self._end(e.request_id, FinishReason.ERROR.value)
                self.scheduler.update(out, {})
                self.step_seconds += time.perf_counter() - t0
                return True
            tokens: dict[str, Any] = {}
            for rid, s in sampled.items():
                if isinstance(s, VerifyOutput):
                    # Tokens past a channel boundary were verified under a mask that no longer
                    # applies: the machine keeps those up to the boundary only.
                    machine = self._live[rid].machine
                    keep = machine.fixed_mask_run(s.samples) if machine is not None else len(s.samples)
                    tokens[rid] = [x.token_id for x in s.samples[:keep]]
                else:
                    tokens[rid] = s.token_id
            results = self.scheduler.update(out, tokens)
            committed = collections.Counter(res.request.request_id for res in results)
            for rid, s in sampled.items():
                if isinstance(s, VerifyOutput) and s.num_draft_tokens:
                    self._record_drafts(rid, s, committed[rid])
            index: collections.Counter = collections.Counter()
            for res in results:
                rid = res.request.request_id
                if rid not in self._live:
                    continue  # ended by an earlier token of this step
                s = sampled[rid]
                sample = s.samples[index[rid]] if isinstance(s, VerifyOutput) else s
                index[rid] += 1
                self._on_token(res.request, sample, res.finished)
            self.step_seconds += time.perf_counter() - t0
            return True

    def _plan_drafts(self) -> None:
        """Sets each running request's draft slots for this step (0: a plain decode)."""
        if self.speculative is None:
            return
        k = self.speculative.num_speculative_tokens
        proposer = self.runner.proposer
        for r in self.scheduler.running:
            r.num_lookahead_tokens = 0
            live = self._live.get(r.request_id)
            if (live is None or not live.speculate or r.num_tokens - r.num_computed_tokens != 1
                    or not self.acceptance.allows(r.request_id, self.num_steps)
                    or (live.machine is not None and not live.machine.mask_is_fixed)):
                continue
            # The last sampled token needs no slot: drafts stop one short of max_tokens.
            room = min(k, r.params.max_tokens - r.num_output_tokens - 1)
            if room > 0:
                r.num_lookahead_tokens = proposer.lookahead(r, room)

    def _record_drafts(self, rid: str, s: VerifyOutput, committed: int) -> None:
        """Counts a verification: drafts that made it into the output accepted, the rest rejected."""
        accepted = min(s.num_accepted, committed)
        self.acceptance.record(rid, s.num_draft_tokens, accepted, self.num_steps)
        live = self._live.get(rid)
        if live is not None:
            live.num_drafted += s.num_draft_tokens
            live.num_accepted += accepted

    def _masks(self, out) -> dict[str, np.ndarray]:
        rows = [(e.request_id, self._live[e.request_id].machine) for e in out.scheduled
                if e.samples and self._live[e.request_id].machine is not None]
        if not rows:
            return {}
        t = time.perf_counter()
        buf = np.empty((len(rows), self.vocab.n_words), np.int32)
        fill_masks([m for _, m in rows], buf)
        self.mask_seconds += time.perf_counter() - t
        return {rid: buf[i] for i, (rid, _) in enumerate(rows)}

    def _on_token(self, request: Request, sample: SampleOutput, finished: bool) -> None:
        live = self._live[request.request_id]
        h = live.handle
        if not live.prompt_recorded:
            live.prompt_recorded = True
            if live.machine is not None:
                live.machine.record_prompt(request.num_prompt_tokens, request.num_cached_tokens,
                                           _image_tokens(request))
        if sample.hidden is not None and live.machine is not None and self.effort.probe is not None:
            h.reasoning_budget = self.effort.probe.budget(sample.hidden)
            live.machine.set_budget(h.reasoning_budget)
        h.output_token_ids.append(sample.token_id)
        h.logprobs.append(sample)
        self.num_output_tokens += 1
        if live.machine is None:
            text = live.decoder.push(sample.token_id) if live.decoder is not None else ""
            events = [ev.AnswerDelta(text)] if text else []
            if request.params.logprobs:
                events = self._attach_logprobs(live, sample, events, in_answer=True)
            h._push(events)
            if finished:
                self._end(request.request_id, request.finish_reason.value)
            return
        events = live.machine.advance(sample.token_id)
        if request.params.logprobs:
            events = self._attach_logprobs(live, sample, events,
                                           in_answer=live.machine.state is State.ANSWER)
        h._push([e for e in events if not isinstance(e, ev.Finished)])
        if live.machine.done:
            if not finished:  # the machine ended the turn on a token the scheduler did not stop at
                self.scheduler.abort(request.request_id, FinishReason.STOP)
            self._end(request.request_id, live.machine.finish_reason, finished_event=events[-1])
        elif finished:
            self._end(request.request_id, request.finish_reason.value)

    @staticmethod
    def _attach_logprobs(live: _Live, sample: SampleOutput, events: list, *, in_answer: bool) -> list:
        """Gives each AnswerDelta the samples of the answer tokens its text completes."""
        if in_answer:
            live.pending_logprobs.append(sample)
        out = []
        for e in events:
            if isinstance(e, ev.AnswerDelta) and live.pending_logprobs:
                e = dataclasses.replace(e, logprobs=tuple(live.pending_logprobs))
                live.pending_logprobs = []
            out.append(e)
        return out

    def _end(self, rid: str, reason: str, finished_event: ev.Finished | None = None) -> None:
        """Closes a request's stream (the scheduler has freed it) and stores the response."""
        live = self._live.pop(rid, None)
        if live is None:
            return
        h, r = live.handle, live.request
        events: list[ev.Event] = []
        if finished_event is None:
            if live.machine is not None:
                if not live.prompt_recorded:
                    live.machine.record_prompt(r.num_prompt_tokens, r.num_cached_tokens, _image_tokens(r))
                events = live.machine.finish(reason)
            else:
                if live.decoder is not None:
                    tail = live.decoder.flush()
                    if tail:
                        events.append(ev.AnswerDelta(tail))
                events.append(ev.Finished(reason, ev.Usage(
                    input_tokens=r.num_prompt_tokens, cached_input_tokens=r.num_cached_tokens,
                    image_tokens=_image_tokens(r),
                    answer_tokens=r.num_output_tokens)))
            finished_event = events[-1]
            if live.pending_logprobs:  # a flushed tail carries the samples still waiting
                events = [dataclasses.replace(e, logprobs=tuple(live.pending_logprobs))
                          if isinstance(e, ev.AnswerDelta) else e for e in events]
        if live.num_drafted:
            usage = dataclasses.replace(finished_event.usage,
                                        **spec_usage_fields(live.num_drafted, live.num_accepted))
            patched = dataclasses.replace(finished_event, usage=usage)
            events = [patched if e is finished_event else e for e in events]
            finished_event = patched
        if self.acceptance is not None:
            self.acceptance.forget(rid)
            self.runner.proposer.release([rid])
        if live.store and reason not in (FinishReason.CANCELLED.value, FinishReason.ERROR.value):
            self.responses.put(self._stored(live, reason, finished_event.usage))
        h._push(events if events else [finished_event])

    def _stored(self, live: _Live, reason: str, usage: ev.Usage) -> StoredResponse:
        h = live.handle
        messages = None
        if live.messages is not None:
            calls = [{"type": "function", "function": {"name": e.name, "arguments": e.arguments}}
                     for e in h.events if isinstance(e, ev.ToolCallDone)]
            msg: dict[str, Any] = {"role": "assistant", "content": h.text(ev.AnswerDelta)}
            reasoning = h.text(ev.ReasoningDelta)
            if reasoning:
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = calls
            messages = tuple(live.messages) + (msg,)
        return StoredResponse(h.request_id, messages, tuple(h.prompt_token_ids),
                              tuple(h.output_token_ids), reason, usage, live.tools,
                              live.request.mm_spans, live.request.mm_inputs)

    def _drain_inbox(self) -> None:
        while True:
            with self._wake:
                if not self._inbox:
                    return
                op, rid, live = self._inbox.popleft()
            if op == "add":
                self._live[rid] = live
                try:
                    self.scheduler.add(live.request)
                except ValueError as e:  # checked in submit; a race on ids ends up here
                    del self._live[rid]
                    live.handle._push([ev.Finished(FinishReason.ERROR.value, ev.Usage())])
                    log.warning("request %s rejected: %s", rid, e)
            elif op == "cancel":
                if self.scheduler.cancel(rid) is not None:
                    self._end(rid, FinishReason.CANCELLED.value)

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Steps until no request is left (manual driving, tests, batch jobs); returns the steps."""
        n = 0
        while self.has_work() and (max_steps is None or n < max_steps):
            self.step()
            n += 1
        return n

    def start(self) -> None:
        """Runs the loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kestrel-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the loop thread (running requests stay queued)."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait(0.5)
                if self._stopping:
                    return
            self.step()

    # ------------------------------------------------------------------ metrics

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        rate = self.num_output_tokens / self.step_seconds if self.step_seconds else 0.0
        return EngineStats(
            num_waiting=s.num_waiting + len(self._inbox), num_running=s.num_running,
            pages_in_use=s.pages_in_use, pages_free=s.pages_free,
            prefix_hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            num_preemptions=s.num_preemptions, num_computed_tokens=s.num_computed_tokens,
            num_output_tokens=self.num_output_tokens, output_tokens_per_s=rate,
            mask_seconds=self.mask_seconds, step_seconds=self.step_seconds,
            num_stored_responses=len(self.responses),
            num_draft_tokens=self.acceptance.drafted if self.acceptance else 0,
            num_accepted_tokens=self.acceptance.accepted if self.acceptance else 0)


def _image_tokens(request: Request) -> int:
    return sum(span.length for span in request.mm_spans)


def _function_tool(t: FunctionTool | Mapping[str, Any]) -> FunctionTool:
    if isinstance(t, FunctionTool):
        return t
    if not isinstance(t, Mapping):
        raise ValueError(f"a tool must be a FunctionTool or an OpenAI tool dict, got {type(t).__name__}")
    fn = t.get("function", t)
    if t.get("type", "function") != "function" or not isinstance(fn, Mapping) or "name" not in fn:
        raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {dict(t)!r}")
    return FunctionTool(fn["name"], fn.get("parameters", {"type": "object", "properties": {}}),
                        fn.get("description", ""))


def _tool_schema(t: FunctionTool) -> dict[str, Any]:
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": dict(t.parameters)}}
