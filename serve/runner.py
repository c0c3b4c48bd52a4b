"""The model runner, the only JAX in ``serve/``: paged K/V arrays, bucketed jitted steps, sampling.

Each engine step hands the runner a ``SchedulerOutput``. Its entries split into decodes (one new
token) and prefill chunks (several); each kind runs as one jitted call over a batch padded to a
bucket of sizes, so a warm engine never recompiles for a new request length:

- decode: ``[B, 1]`` tokens, B a power of two up to ``max_num_seqs`` (at least ``min_batch``
  while rows are small: ``serve/buckets.batch_rows``), page tables padded to a width M of the
  form 2^k or 3 * 2^(k-1); attention is the paged decode kernel.
- sliding-window groups get tables that start at the first page the window still sees (with the
  offset in tokens), so their gathers and scores stay ``W + T`` keys wide at any context.
- prefill: the chunks' real tokens packed into one row ``[1, N]`` (N >= 16 of the form 2^k or
  3 * 2^(k-1)), so projections and MLPs never compute padding; attention alone unpacks them to
  ``[B, T]`` (B bucketed as for decode) and gathers each sequence's pages (see
  ``model/paged_cache.py``).

The page arrays, ``[K, P, G, H]`` per layer, live here and are donated to every step; the new
tokens' K/V are scattered into them through a slot mapping built from the scheduler's page tables.
Images: a prefill chunk that computes image placeholders gets their soft tokens spliced in place
of the token embeddings and their span marked bidirectional; the soft tokens come from an
``ImageEmbeddingCache`` (each distinct image encoded once, the step's new images in one batch).
Sampling runs on device in the same call: repetition / frequency / presence penalties, the channel
machine's int32 bitmask, then greedy or temperature sampling with top-k / top-p / min-p. A row's
key is ``fold_in(key(seed), output index)``, so a seeded request draws the same tokens however it
is batched, preempted or recomputed. Optional logprobs: of the model's raw distribution, for the
sampled token and the 20 best alternatives.

Speculative decoding: an entry with ``num_lookahead`` slots gets drafts from ``proposer``
(``serve.speculative``); such entries run as one ``[B, 1 + k]`` verification pass, each row
left-padded so its queries are its last positions (the layout of the paged decode kernel), with
target logits at every position; ``serve.rejection`` accepts the longest valid draft prefix plus
one target token. The result is a ``VerifyOutput``; the scheduler rolls back rejected slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.paged_cache import POINTER_GROUP, PagedKVCache
from model.token_shift import NO_PREVIOUS
from model.sampling import filter_logits
from model.transformer import Transformer
from serve.image_cache import ImageEmbeddingCache
from serve.buckets import (MIN_TABLE_PAGES, PREFILL_TILE, batch_rows, length_bucket, min_table_width,
                           pow2, table_bucket, tile_rows, tiles_pay)
from serve.kv_pages import KVCacheManager
from serve.rejection import processed_probs, unpack_mask, verify_drafts
from serve.request import MAX_TOP_LOGPROBS
from serve.scheduler import ScheduledRequest, SchedulerOutput


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """One sampled token.

    Attributes:
      token_id: the token.
      logprob: its log-probability under the model (``None`` unless the request asked).
      top_logprobs: ``(token id, logprob)`` of the most likely tokens, best first.
      hidden: the final hidden state [D] at the last prompt token, for the first token of a
        request with ``wants_hidden`` (else None).
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    hidden: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _Flags:
    """What a batch needs from the sampler; static, so a greedy batch compiles to an argmax."""

    sampling: bool  # some row has temperature > 0
    penalties: bool
    masked: bool
    logprobs: bool  # with MAX_TOP_LOGPROBS alternatives
    filtering: bool = False  # some sampled row has top-k, top-p or min-p on
    hidden: bool = False  # return each row's last hidden state (prefill of a wants_hidden request)
    probs: bool = False  # return each row's sampling distribution [B, V] (a draft model's q)


class StaticGraph:
    """A model's ``GraphDef`` as a static jit argument, hashed once.

    jit hashes its static arguments at every call, and hashing an NNX ``GraphDef`` walks every
    node of the model: for SmolLM2-135M's 30 layers that measured 20 to 60 ms per call on the
    shared 2-core CPU, up to a tenth of a batch-32 decode step. Equal graphs still compare equal, so
    runners of one model structure share compilations.
    """

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)


def sample_tokens(logits, p: Mapping[str, jax.Array], flags: _Flags):
    """Penalties, mask and sampling of one token per row.

    Args:
      logits: [B, V] float32 model logits.
      p: per-row arrays: temperature, top_k, top_p, min_p [B]; seed [B] uint32; out_index [B];
        repetition, frequency, presence [B]; history [B, L] (prompt + output ids, -1 padding) and
        history_is_output [B, L]; mask int32[B, ceil(V/32)].
      flags: which stages the batch needs.

    Returns:
      (tokens [B] int32, logprobs [B], top ids [B, 20], top logprobs [B, 20]); the last three
      are None without ``flags.logprobs``.
    """
    b, vocab = logits.shape
    x = logits
    if flags.penalties:
        rows = jnp.arange(b)[:, None]
        idx = jnp.where(p["history"] < 0, vocab, p["history"])
        seen = jnp.zeros((b, vocab), bool).at[rows, idx].set(True, mode="drop")
        out_idx = jnp.where(p["history_is_output"], idx, vocab)
        counts = jnp.zeros((b, vocab), jnp.float32).at[rows, out_idx].add(1.0, mode="drop")
        rp = p["repetition"][:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rp, x * rp), x)
        x = x - p["frequency"][:, None] * counts - p["presence"][:, None] * (counts > 0)
    if flags.masked:
        x = jnp.where(unpack_mask(p["mask"], vocab), x, -jnp.inf)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if flags.sampling:
        temperature = p["temperature"]
        scaled = x / jnp.maximum(temperature, 1e-6)[:, None]
        if flags.filtering:
            scaled = filter_logits(scaled, top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"])
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(p["seed"], p["out_index"])
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled)
        tokens = jnp.where(temperature > 0, drawn.astype(jnp.int32), tokens)
    lp = top_ids = top_lp = None
    if flags.logprobs:
        lsm = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(lsm, tokens[:, None], axis=1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lsm, min(MAX_TOP_LOGPROBS, lsm.shape[-1]))
    if flags.probs:  # q for rejection sampling: one-hot for greedy rows
        probs = jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)
        if flags.sampling:
            probs = jnp.where((p["temperature"] > 0)[:, None], processed_probs(x[:, None], p)[:, 0], probs)
        return tokens, lp, top_ids, top_lp, probs
    return tokens, lp, top_ids, top_lp


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
def _step(graph, layer_groups, attn_impl, flags, state, k, v, tokens, tables, slots, positions,
          lengths, logits_index, sp, packing=None, images=None, table_offsets=None,
          exit_threshold=None, prev_tokens=None):
    """One forward pass over paged K/V plus sampling; module-level so that runners of one model
    structure share compilations (``graph``: a ``StaticGraph``).

    ``packing`` (prefill): ``(unpack [B, T], pack [N], query_positions [B, T])``; tokens,
    positions and slots are then one packed row [1, N] and ``logits_index`` [B] indexes it.
    ``images`` (prefill): ``(index [1, N], rows [R, D], span_ids [B, T])``: token j takes soft
    token ``rows[index[j]]`` instead of its embedding where ``index[j] >= 0``.
    ``exit_threshold`` (decode, early exit): a float32 scalar; the step then also returns the
    exit layer taken (int32, 0: none; see ``Transformer.__call__``).
    ``prev_tokens`` (token-shift models): the token before each of ``tokens``, laid out as they are.
    """
    model = nnx.merge(graph.graphdef, state)
    unpack, pack, query_positions = packing if packing is not None else (None, None, None)
    cache = PagedKVCache(k=k, v=v, page_tables=tables, slots=slots, positions=positions,
                         lengths=lengths, layer_groups=layer_groups, unpack=unpack, pack=pack,
                         query_positions=query_positions,
                         span_ids=None if images is None else images[2],
                         table_offsets=table_offsets)
    embeddings = None
    if images is not None:
        index, rows, _ = images
        is_image = index >= 0
        embeddings = model.embed(jnp.where(is_image, 0, tokens))
        picked = jnp.take(rows, jnp.maximum(index, 0), axis=0).astype(embeddings.dtype)
        embeddings = jnp.where(is_image[..., None], picked, embeddings)
    last_hidden = None
    exit_layer = jnp.int32(0)
    if packing is None and exit_threshold is not None:  # early exit: decode only
        logits, cache, exit_layer = model(tokens, cache=cache, attn_impl=attn_impl,
                                          exit_threshold=exit_threshold, prev_tokens=prev_tokens)
        logits = logits[:, 0]
    elif packing is None:
        logits, cache = model(tokens, cache=cache, attn_impl=attn_impl, logits_index=logits_index,
                              prev_tokens=prev_tokens)
        logits = logits[:, 0]
    else:  # logits of each sequence's last token only: [B] indices into the packed row
        logits, cache, hidden = model(tokens, cache=cache, attn_impl=attn_impl, embeddings=embeddings,
                                      prev_tokens=prev_tokens, logits_index=logits_index[None],
                                      return_hidden=True)
        last_hidden = hidden[0][logits_index]
        logits = logits[0]
    out = sample_tokens(logits, sp, flags)
    if flags.hidden and last_hidden is not None:
        out = (*out, last_hidden.astype(jnp.float32))
    return out, cache.k, cache.v, exit_layer


def _tokens_before(e: ScheduledRequest, fed) -> list[int]:
    """The token before each fed token (token-shift models): the history's token before the
    first (or ``e.prev_token_id``), then the fed tokens themselves."""
    first = e.prev_token_id
    if first is None:
        p = e.start_position
        first = e.request.token_slice(p - 1, p)[0] if p > 0 else NO_PREVIOUS
    return [first, *fed[:-1]]


def _overlap(e: ScheduledRequest, span) -> bool:
    return span.offset < e.start_position + len(e.token_ids) and e.start_position < span.offset + span.length


def _image_key(request, span) -> str:
    """The image embedding cache's key: the image's content hash, under the request's
    ``cache_salt`` when it has one, so that (as with prefix-cache pages) a tenant can neither reuse
    nor time another tenant's encoded images."""
    salt = request.cache_salt
    return span.content_hash if salt is None else f"{span.content_hash}:salt:{salt}"


def _image_overlaps(e: ScheduledRequest) -> bool:
    """Whether the entry computes any image placeholder."""
    return any(_overlap(e, span) for span in e.request.mm_spans)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
def _verify_step(graph, layer_groups, attn_impl, flags, state, k, v, tokens, tables, slots,
                 positions, lengths, pad, drafts, num_drafts, sp, draft_probs=None, prev_tokens=None):
    """One target pass over each row's fed token + drafts (left-padded to [B, T]), then draft
    verification (``serve.rejection.verify_drafts``); ``pad`` [B] is each row's left padding;
    ``graph`` is the runner's ``StaticGraph``, hashed once, as in ``_step``."""
    model = nnx.merge(graph.graphdef, state)
    cache = PagedKVCache(k=k, v=v, page_tables=tables, slots=slots, positions=positions,
                         lengths=lengths, layer_groups=layer_groups)
    logits, cache = model(tokens, cache=cache, attn_impl=attn_impl, prev_tokens=prev_tokens)  # [B, T, V]
    t = tokens.shape[1]
    idx = jnp.minimum(pad[:, None] + jnp.arange(t)[None, :], t - 1)  # real positions first
    logits = jnp.take_along_axis(logits, idx[..., None], axis=1)
    out = verify_drafts(logits, drafts, num_drafts, sp, sampling=flags.sampling,
                        masked=flags.masked, draft_probs=draft_probs)
    return out, cache.k, cache.v


@dataclasses.dataclass(frozen=True)
class Draft:
    """A proposer's draft for one request.

    Attributes:
      token_ids: the draft tokens (possibly fewer than the slots reserved; empty: no draft).
      probs: [len(token_ids), V] distributions they were sampled from (a draft model), or None
        for deterministic drafts (prompt lookup): q is then one-hot.
    """

    token_ids: tuple[int, ...]
    probs: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class VerifyOutput:
    """The tokens a speculative step produced for one request.

    Attributes:
      samples: the accepted drafts, then the target's own token (correction or bonus).
      num_draft_tokens: drafts verified in the step.
    """

    samples: tuple[SampleOutput, ...]
    num_draft_tokens: int

    @property
    def num_accepted(self) -> int:
        return len(self.samples) - 1


class ModelRunner:
    """Owns the paged K/V arrays and runs the jitted steps.

    Args:
      model: the Transformer to serve.
      kv_manager: the scheduler's page manager (its groups size the page arrays).
      attn_impl: attention kernel implementation (``auto``: reference on CPU, Pallas on GPU).
      cache_dtype: dtype of the K/V pages (default: the model's compute dtype); ``int8`` keeps
        int8 pages with per-(kv head, page) scales (``model/kv_int8.py``).
      min_batch: smallest batch bucket (fewer, larger buckets mean fewer compilations; padding
        rows cost little next to a dispatch).
      min_table_pages: smallest page-table width bucket.
      max_cached_images: image embeddings kept by content hash (models with a vision tower).
      layer_groups: the page group of each layer (default: from the model's layer types); a draft
        model maps its layers onto the target's groups.
      prefill_tile: query tokens per row of a prefill step's attention (a power of two; None:
        one row per sequence, padded to the longest chunk).
      early_exit_threshold: decode with early exit (the model's ``exit_layers``): a step stops
        at an exit layer when the exit head's top probability exceeds this for every row of the
        batch. ``None`` (default): off. ``exit_counts`` counts decode steps per exit layer
        (0: ran every layer).
    """

    def __init__(self, model: Transformer, kv_manager: KVCacheManager, *, attn_impl: str = "auto",
                 cache_dtype: str | None = None, min_batch: int = 8,
                 min_table_pages: int = MIN_TABLE_PAGES, max_cached_images: int = 256,
                 layer_groups: tuple[int, ...] | None = None, early_exit_threshold: float | None = None,
                 prefill_tile: int | None = PREFILL_TILE):
        cfg = model.config
        if early_exit_threshold is not None:
            if not cfg.exit_layers:
                raise ValueError("early exit needs a model trained with exit heads; this model's "
                                 "config has no exit_layers")
            if cfg.pointer_dim:
                raise ValueError("early exit is not supported with a pointer (ModelConfig.pointer_dim): "
                                 "the pointer reads the last layer's hidden states")
            if not 0.0 <= early_exit_threshold <= 1.0:
                raise ValueError(f"early_exit_threshold must be in [0, 1], got {early_exit_threshold}")
        self.early_exit_threshold = early_exit_threshold
        self.exit_counts: dict[int, int] = {}
        self.config = cfg
        self.graphdef, self.state = nnx.split(model)
        self.graph = StaticGraph(self.graphdef)
        self.attn_impl = attn_impl
        self.page_size = kv_manager.page_size
        if layer_groups is not None:  # a draft model reading the target's page tables
            if len(layer_groups) != cfg.num_layers or not all(0 <= g < len(kv_manager.groups) for g in layer_groups):
                raise ValueError(f"layer_groups {layer_groups} must name one of the "
                                 f"{len(kv_manager.groups)} page groups per layer")
            self.layer_groups = tuple(layer_groups)
        else:
            self.layer_groups = KVCacheManager.group_of_layer(cfg.layer_types)
        if layer_groups is None and len(kv_manager.groups) != max(self.layer_groups) + 1:
            raise ValueError(f"kv_manager has {len(kv_manager.groups)} page groups; the model's layer "
                             f"types {sorted(set(cfg.layer_types))} need {max(self.layer_groups) + 1}")
        self.num_pages = tuple(g.pool.num_pages for g in kv_manager.groups)
        self.windows = tuple(g.window for g in kv_manager.groups)
        self.k, self.v = PagedKVCache.create_pages(cfg, self.num_pages, self.page_size,
                                                   self.layer_groups, cache_dtype)
        # Committed to the model's device from the start: jit keys its cache on whether arguments
        # are committed, and the steps return committed pages, so fresh uncommitted ones made the
        # first step's shapes compile twice (once more inside bench/serving.py's first timed round).
        on_device = [x for x in jax.tree.leaves(self.state) if isinstance(x, jax.Array)]
        device = next(iter(on_device[0].devices())) if on_device else jax.devices()[0]
        self.k, self.v = jax.device_put((self.k, self.v), device)
        self.min_batch, self.min_table_pages = min_batch, min_table_pages
        if prefill_tile is not None and (prefill_tile < 1 or prefill_tile & (prefill_tile - 1)):
            raise ValueError(f"prefill_tile must be a power of two or None, got {prefill_tile}")
        self.prefill_tile = prefill_tile
        self.num_steps = 0  # jitted calls run
        self.images = None if cfg.vision is None else ImageEmbeddingCache(
            self.graphdef, self.state, attn_impl=attn_impl, max_images=max_cached_images)
        # Speculative decoding: proposes drafts for entries with num_lookahead (prompt lookup or a
        # draft model, ``serve.speculative``); None: lookahead entries run as plain decodes.
        self.proposer = None

    @property
    def kv_bytes(self) -> int:
        """Bytes of all K/V page arrays (int8 values and their scales when quantized)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v))))

    def kv_bytes_per_token(self) -> float:
        """K/V bytes one cached token takes over all layers and a pointer (page arrays / page slots)."""
        total = 0.0
        pointer = (POINTER_GROUP,) if len(self.k) > len(self.layer_groups) else ()
        for layer, g in enumerate(self.layer_groups + pointer):
            layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.k[layer], self.v[layer])))
            total += layer_bytes / (self.num_pages[g] * self.page_size)
        return total

    @staticmethod
    def compiled_variants() -> int:
        """How many shapes/flag sets the step has been compiled for, over all runners."""
        return _step._cache_size()

    # ------------------------------------------------------------------ host

    def execute(self, output: SchedulerOutput,
                masks: Mapping[str, np.ndarray] | None = None) -> dict[str, SampleOutput]:
        """Computes one scheduler step.

        Args:
          output: this step's work.
          masks: per request id, the channel machine's int32[ceil(V/32)] bitmask for the token
            sampled in this step (requests without one sample from the whole vocabulary).

        Returns:
          The sampled token of every entry with ``samples=True``.
        """
        masks = masks or {}
        # A chunk with image placeholders takes the prefill path (embeddings spliced), even at 1 token;
        # with early exit so does a 1-token prompt chunk, so that only output tokens ever exit.
        def is_prefill(e):
            return len(e.token_ids) > 1 or _image_overlaps(e) or (
                self.early_exit_threshold is not None and e.start_position < e.request.num_prompt_tokens)

        lookahead = [e for e in output.scheduled if e.num_lookahead]
        drafts = self.proposer.propose(lookahead, masks) if lookahead and self.proposer else {}
        spec = [e for e in lookahead if drafts.get(e.request_id) and drafts[e.request_id].token_ids]
        prefills = [e for e in output.scheduled if is_prefill(e)]
        decodes = [e for e in output.scheduled if not is_prefill(e) and e not in spec]
        if spec:
            # Decodes the verification pass can carry ride along as rows without drafts: one
            # target pass per step instead of a verify pass plus a decode pass of similar cost.
            riders = [e for e in decodes if self._can_ride(e)]
            spec, decodes = spec + riders, [e for e in decodes if e not in riders]
        results: dict[str, SampleOutput | VerifyOutput] = {}
        if prefills:
            t = length_bucket(max(len(e.token_ids) for e in prefills))
            results.update(self._run(prefills, t, masks))
        if decodes:
            results.update(self._run(decodes, 1, masks))
        if spec:
            results.update(self._verify(spec, drafts, masks))
        for e in lookahead:  # a lookahead entry without a draft decoded plainly
            if e.request_id in results and not isinstance(results[e.request_id], VerifyOutput):
                results[e.request_id] = VerifyOutput((results[e.request_id],), 0)
        return results

    def _can_ride(self, e: ScheduledRequest) -> bool:
        """Whether a one-token decode can join a verification pass as a row with no drafts
        (verification samples no penalties or logprobs and takes no early exit)."""
        sp = e.request.params
        return (e.samples and self.early_exit_threshold is None and not sp.logprobs
                and sp.repetition_penalty == 1.0 and sp.frequency_penalty == 0.0
                and sp.presence_penalty == 0.0)

    def _verify(self, entries: list[ScheduledRequest], drafts: Mapping[str, Draft],
                masks) -> dict[str, SampleOutput | VerifyOutput]:
        """Feeds each entry its token + drafts at once and verifies the drafts (one target pass).

        Entries without a draft in ``drafts`` are plain decodes riding along (no drafts): a
        ``SampleOutput`` for those without lookahead slots, a ``VerifyOutput`` for the others.
        """
        n = len(entries)
        drafts = {e.request_id: drafts.get(e.request_id) or Draft(()) for e in entries}
        k_max = max(len(drafts[e.request_id].token_ids) for e in entries)
        # Each padding row would cost 1 + k positions: keep the batch bucket's padded positions
        # near a plain decode's (min_batch rows of one token) instead of min_batch rows of 1 + k.
        b = pow2(n, max(1, self.min_batch // (k_max + 1)))
        # Exact width: at most num_speculative_tokens compiled widths, and no padded positions
        # (a power-of-two bucket would compute 8 positions for 4 drafts).
        t = k_max + 1
        G = self.page_size
        m = pow2(max(len(e.page_tables[0]) for e in entries), self.min_table_pages)
        n_groups = len(self.num_pages)
        tokens = np.zeros((b, t), np.int32)
        positions = np.full((b, t), -1, np.int32)
        lengths = np.full((b,), t, np.int32)  # padding rows: any valid length; they write nothing
        pad = np.zeros((b,), np.int32)
        draft_ids = np.zeros((b, t - 1), np.int32)
        num_drafts = np.zeros((b,), np.int32)
        tables = np.full((n_groups, b, m), -1, np.int32)
        slots = np.full((n_groups, b, t), -1, np.int32)
        with_probs = any(drafts[e.request_id].probs is not None for e in entries)
        vocab = self.config.vocab_size
        probs = np.zeros((b, t - 1, vocab), np.float32) if with_probs else None
        prev = np.full((b, t), NO_PREVIOUS, np.int32) if self.config.token_shift else None
        for i, e in enumerate(entries):
            d = drafts[e.request_id]
            k = len(d.token_ids)
            if k > e.num_lookahead:
                raise ValueError(f"proposer returned {k} drafts for {e.request_id!r}; "
                                 f"{e.num_lookahead} slots were reserved")
            feed = list(e.token_ids) + list(d.token_ids)
            pos = e.start_position + np.arange(len(feed))
            pad[i] = t - len(feed)  # left padding: the kernel's queries are the last T positions
            tokens[i, pad[i]:] = feed
            if prev is not None:
                prev[i, pad[i]:] = _tokens_before(e, feed)
            positions[i, pad[i]:] = pos
            lengths[i] = pos[-1] + 1
            draft_ids[i, :k] = d.token_ids
            num_drafts[i] = k
            if d.probs is not None:
                probs[i, :k] = np.asarray(d.probs)
            for g, table in enumerate(e.page_tables):
                table = np.asarray(table, np.int32)
                tables[g, i, :len(table)] = table
                slots[g, i, pad[i]:] = table[pos // G] * G + pos % G
        sp, flags = self._sampling_inputs(entries, b, masks)
        if flags.penalties or flags.logprobs:
            raise ValueError("speculative verification does not support penalties or logprobs; "
                             "the engine decodes such requests without drafts")
        (out_tokens, accepted), self.k, self.v = _verify_step(
            self.graph, self.layer_groups, self.attn_impl, flags, self.state, self.k, self.v,
            jnp.asarray(tokens), tuple(jnp.asarray(x) for x in tables),
            tuple(jnp.asarray(x) for x in slots), jnp.asarray(positions), jnp.asarray(lengths),
            jnp.asarray(pad), jnp.asarray(draft_ids), jnp.asarray(num_drafts), sp,
            None if probs is None else jnp.asarray(probs), None if prev is None else jnp.asarray(prev))
        self.num_steps += 1
        out_tokens, accepted = np.asarray(out_tokens), np.asarray(accepted)
        out: dict[str, SampleOutput | VerifyOutput] = {}
        for i, e in enumerate(entries):
            samples = tuple(SampleOutput(int(x)) for x in out_tokens[i, :accepted[i] + 1])
            out[e.request_id] = VerifyOutput(samples, int(num_drafts[i])) if e.num_lookahead else samples[0]
        return out

    def _run(self, entries: list[ScheduledRequest], t: int, masks, *,
             probs: bool = False) -> dict[str, SampleOutput]:
        n = len(entries)
        G = self.page_size
        n_groups = len(self.num_pages)
        # A sliding group's table starts at the first page its window sees at this step's first
        # query, so its gather and scores stay W + T keys wide as a sequence grows.
        first = np.zeros((n_groups, n), np.int64)
        for g, window in enumerate(self.windows):
            if window is not None:
                first[g] = [max(0, e.start_position - window + 1) // G for e in entries]
        widths = [table_bucket(max(len(e.page_tables[g]) - int(first[g, i]) for i, e in enumerate(entries)),
                               min_table_width(self.windows[g], t, G, self.min_table_pages))
                  for g in range(n_groups)]
        cfg = self.config
        b = batch_rows(n, t, max(widths) * G, cfg.num_heads * t + 2 * cfg.num_kv_heads * cfg.head_dim,
                       self.min_batch)  # sampling rows: one per entry
        # The attention grid's rows: (entry, first token in its chunk, tokens). A prefill without
        # images may be cut into query tiles of ``prefill_tile`` tokens, each a row over its
        # entry's pages, when that gathers and scores less (``tiles_pay``): chunks of different
        # lengths then score about their real tokens instead of every row padded to the longest
        # (SmolLM2 serving: 24 chunks of 46-130 tokens had filled ~40% of a [32 x 192] grid).
        tile = self.prefill_tile
        grid = [(i, 0, len(e.token_ids)) for i, e in enumerate(entries)]
        n_rows = b
        if t > 1 and tile and tile < t and not any(_image_overlaps(e) for e in entries):
            tiles = [(i, o, min(tile, len(e.token_ids) - o)) for i, e in enumerate(entries)
                     for o in range(0, len(e.token_ids), tile)]
            rows = tile_rows(len(tiles), self.min_batch)
            if tiles_pay(b, t, rows, tile, cfg.num_heads, 2 * cfg.num_kv_heads * cfg.head_dim):
                grid, n_rows, t = tiles, rows, tile
        tokens = np.zeros((n_rows, t), np.int32)
        prev = np.full((n_rows, t), NO_PREVIOUS, np.int32) if cfg.token_shift else None
        positions = np.full((n_rows, t), -1, np.int32)
        lengths = np.zeros((n_rows,), np.int32)
        logits_index = np.zeros((b,), np.int32)
        tables = [np.full((n_rows, m), -1, np.int32) for m in widths]
        offsets = np.zeros((n_groups, n_rows), np.int32)
        slots = np.full((n_groups, n_rows, t), -1, np.int32)
        before = [_tokens_before(e, e.token_ids) for e in entries] if prev is not None else None
        for r, (i, o, c) in enumerate(grid):
            e = entries[i]
            pos = e.start_position + o + np.arange(c)
            tokens[r, :c] = e.token_ids[o:o + c]
            if prev is not None:
                prev[r, :c] = before[i][o:o + c]
            positions[r, :c] = pos
            lengths[r] = e.start_position + len(e.token_ids)
            for g, table in enumerate(e.page_tables):
                table = np.asarray(table, np.int32)
                lo = int(first[g, i])
                tables[g][r, :len(table) - lo] = table[lo:]
                offsets[g, r] = lo * G
                slots[g, r, :c] = table[pos // G] * G + pos % G
        packing = None
        if t > 1:
            # Pack the real tokens into one row so projections and MLPs skip the padding.
            real = positions >= 0  # [rows, T]
            total = int(real.sum())
            n_packed = length_bucket(total)
            flat = np.flatnonzero(real.reshape(-1))  # packed token j sits at flat index flat[j]
            unpack = np.full((n_rows * t,), n_packed, np.int32)
            unpack[flat] = np.arange(total, dtype=np.int32)
            pack = np.zeros((n_packed,), np.int32)
            pack[:total] = flat
            # Each entry's tokens are contiguous in the packed row, in entry order: its last
            # token's index is the running count of tokens.
            logits_index[:n] = np.cumsum([len(e.token_ids) for e in entries]) - 1
            packing = (unpack.reshape(n_rows, t), pack, positions)
            pack_row = lambda x, fill: np.concatenate(  # noqa: E731
                [x.reshape(*x.shape[:-2], -1)[..., flat],
                 np.full((*x.shape[:-2], n_packed - total), fill, np.int32)], -1)[..., None, :]
            tokens, positions, slots = pack_row(tokens, 0), pack_row(positions, -1), pack_row(slots, -1)
            if prev is not None:
                prev = pack_row(prev, NO_PREVIOUS)
        images = None
        if t > 1 and any(_image_overlaps(e) for e in entries):
            index, rows, span_ids = self._image_inputs(entries, b, t)
            images = (pack_row(index, -1), rows, span_ids)
        sp, flags = self._sampling_inputs(entries, b, masks)
        if probs:
            flags = dataclasses.replace(flags, probs=True, hidden=False)
        early_exit = t == 1 and self.early_exit_threshold is not None
        # Host arrays go to the jitted call as they are (its C++ path transfers them), with no
        # Python-level jnp.asarray per array.
        outs, self.k, self.v, exit_layer = _step(
            self.graph, self.layer_groups, self.attn_impl, flags, self.state, self.k, self.v,
            tokens, tuple(tables), tuple(slots), positions, lengths, logits_index, sp, packing,
            images, tuple(offsets), np.float32(self.early_exit_threshold) if early_exit else None,
            prev)
        self.num_steps += 1
        if early_exit:
            layer = int(exit_layer)
            self.exit_counts[layer] = self.exit_counts.get(layer, 0) + 1
        tok, lp, top_ids, top_lp = outs[:4]
        hidden = np.asarray(outs[4]) if flags.hidden and len(outs) > 4 else None
        self.last_probs = outs[4] if flags.probs else None  # [B, V] on device (draft model's q)
        tok = np.asarray(tok)
        lp = None if lp is None else np.asarray(lp)
        top_ids = None if top_ids is None else np.asarray(top_ids)
        top_lp = None if top_lp is None else np.asarray(top_lp)
        out = {}
        for i, e in enumerate(entries):
            if not e.samples:
                continue
            params = e.request.params
            h = hidden[i] if hidden is not None and e.request.wants_hidden else None
            if not params.logprobs:
                out[e.request_id] = SampleOutput(int(tok[i]), hidden=h)
                continue
            k = params.top_logprobs
            top = tuple((int(a), float(c)) for a, c in zip(top_ids[i, :k], top_lp[i, :k])) if k else ()
            out[e.request_id] = SampleOutput(int(tok[i]), float(lp[i]), top, hidden=h)
        return out

    def _image_inputs(self, entries: list[ScheduledRequest], b: int, t: int):
        """(soft-token index [B, T] (-1: text), soft-token rows [R, D], span ids [B, T]) of the
        image placeholders the entries compute; images not cached are encoded here, in one batch."""
        if self.images is None:
            raise ValueError("a request has images but the model has no vision tower")
        wanted = []
        for e in entries:
            r = e.request
            for j, span in enumerate(r.mm_spans):
                if _overlap(e, span):
                    wanted.append((_image_key(r, span), r.mm_inputs[j] if r.mm_inputs else None))
        soft = self.images.get_many(wanted)
        index = np.full((b, t), -1, np.int32)
        span_ids = np.zeros((b, t), np.int32)
        rows, count = [], 0
        for i, e in enumerate(entries):
            start, k = e.start_position, len(e.token_ids)
            for j, span in enumerate(e.request.mm_spans):
                lo, hi = max(span.offset, start), min(span.offset + span.length, start + k)
                if lo >= hi:
                    continue
                rows.append(soft[_image_key(e.request, span)][lo - span.offset:hi - span.offset])
                index[i, lo - start:hi - start] = np.arange(count, count + hi - lo)
                span_ids[i, lo - start:hi - start] = j + 1
                count += hi - lo
        stacked = np.concatenate(rows)
        padded = np.zeros((length_bucket(count), stacked.shape[1]), np.float32)
        padded[:count] = stacked
        return index, padded, span_ids

    def _sampling_inputs(self, entries: list[ScheduledRequest], b: int, masks):
        vocab = self.config.vocab_size
        words = (vocab + 31) // 32
        f = lambda fill, dt: np.full((b,), fill, dt)  # noqa: E731
        p = dict(temperature=f(0.0, np.float32), top_k=f(0, np.int32), top_p=f(1.0, np.float32),
                 min_p=f(0.0, np.float32), seed=f(0, np.uint32), out_index=f(0, np.int32),
                 repetition=f(1.0, np.float32), frequency=f(0.0, np.float32),
                 presence=f(0.0, np.float32))
        penalties = masked = logprobs = False
        for i, e in enumerate(entries):
            if not e.samples:
                continue
            r, sp = e.request, e.request.params
            p["temperature"][i], p["top_k"][i], p["top_p"][i], p["min_p"][i] = (
                sp.temperature, sp.top_k, sp.top_p, sp.min_p)
            p["seed"][i] = (sp.seed or 0) & 0xFFFFFFFF
            p["out_index"][i] = r.num_output_tokens + e.sample_offset
            p["repetition"][i], p["frequency"][i], p["presence"][i] = (
                sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
            penalties |= (sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0
                          or sp.presence_penalty != 0.0)
            masked |= e.request_id in masks
            logprobs |= sp.logprobs
        sampled = p["temperature"] > 0
        sampling = bool(sampled.any())
        filtering = bool((sampled & ((p["top_k"] > 0) | (p["top_p"] < 1.0) | (p["min_p"] > 0))).any())
        if masked:
            mask = np.full((b, words), -1, np.int32)
            for i, e in enumerate(entries):
                if e.samples and e.request_id in masks:
                    mask[i] = masks[e.request_id]
            p["mask"] = mask
        if penalties:
            hist_len = pow2(max(e.request.num_tokens for e in entries), 16)
            history = np.full((b, hist_len), -1, np.int32)
            is_output = np.zeros((b, hist_len), bool)
            for i, e in enumerate(entries):
                ids = e.request.all_token_ids
                history[i, :len(ids)] = ids
                is_output[i, e.request.num_prompt_tokens:len(ids)] = True
            p["history"], p["history_is_output"] = history, is_output
        hidden = any(e.samples and e.request.wants_hidden and len(e.token_ids) > 1 for e in entries)
        flags = _Flags(sampling=sampling, filtering=filtering, penalties=penalties, masked=masked,
                       logprobs=logprobs,
                       hidden=hidden)
        return p, flags  # host arrays: the jitted call transfers them
