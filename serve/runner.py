"""The model runner, the only JAX in ``serve/``: paged K/V arrays, bucketed jitted steps, sampling.

Each engine step hands the runner a ``SchedulerOutput``. Its entries split into decodes (one new
token) and prefill chunks (several); each kind runs as one jitted call over a batch padded to a
bucket of sizes, so a warm engine never recompiles for a new request length:

- decode: ``[B, 1]`` tokens, B a power of two up to ``max_num_seqs``, page tables padded to a
  power-of-two width M; attention is the paged decode kernel.
- prefill: the chunks' real tokens packed into one row ``[1, N]`` (N >= 16 of the form 2^k or
  3 * 2^(k-1)), so projections and MLPs never compute padding; attention alone unpacks them to
  ``[B, T]`` and gathers each sequence's pages (see ``model/paged_cache.py``).

The page arrays, ``[K, P, G, H]`` per layer, live here and are donated to every step; the new
tokens' K/V are scattered into them through a slot mapping built from the scheduler's page tables.
Sampling runs on device in the same call: repetition / frequency / presence penalties, the channel
machine's int32 bitmask, then greedy or temperature sampling with top-k / top-p / min-p. A row's
key is ``fold_in(key(seed), output index)``, so a seeded request draws the same tokens however it
is batched, preempted or recomputed. Optional logprobs: of the model's raw distribution, for the
sampled token and the 20 best alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.paged_cache import PagedKVCache
from model.sampling import filter_logits
from model.transformer import Transformer
from serve.kv_pages import KVCacheManager
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


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 2^k and 3 * 2^(k-1) that is >= n (and >= minimum): padding stays under a
    third of a prefill's tokens (a power-of-two bucket can nearly double them)."""
    b = _pow2(n, minimum)
    return b * 3 // 4 if b * 3 // 4 >= max(n, minimum) else b


@dataclasses.dataclass(frozen=True)
class _Flags:
    """What a batch needs from the sampler; static, so a greedy batch compiles to an argmax."""

    sampling: bool  # some row has temperature > 0 (top-k / top-p / min-p included)
    penalties: bool
    masked: bool
    logprobs: bool  # with MAX_TOP_LOGPROBS alternatives
    hidden: bool = False  # return each row's last hidden state (prefill of a wants_hidden request)


def _unpack_bits(words: jax.Array, vocab: int) -> jax.Array:
    """int32[B, ceil(V/32)] bitmask -> bool[B, V] (bit t % 32 of word t // 32)."""
    v = jnp.arange(vocab)
    return ((words[:, v // 32] >> (v % 32)) & 1).astype(bool)


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
        x = jnp.where(_unpack_bits(p["mask"], vocab), x, -jnp.inf)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if flags.sampling:
        temperature = p["temperature"]
        scaled = x / jnp.maximum(temperature, 1e-6)[:, None]
        scaled = filter_logits(scaled, top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"])
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(p["seed"], p["out_index"])
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled)
        tokens = jnp.where(temperature > 0, drawn.astype(jnp.int32), tokens)
    lp = top_ids = top_lp = None
    if flags.logprobs:
        lsm = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(lsm, tokens[:, None], axis=1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lsm, min(MAX_TOP_LOGPROBS, lsm.shape[-1]))
    return tokens, lp, top_ids, top_lp


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
def _step(graphdef, layer_groups, attn_impl, flags, state, k, v, tokens, tables, slots, positions,
          lengths, logits_index, sp, packing=None):
    """One forward pass over paged K/V plus sampling; module-level so that runners of one model
    structure share compilations.

    ``packing`` (prefill): ``(unpack [B, T], pack [N], query_positions [B, T])``; tokens,
    positions and slots are then one packed row [1, N] and ``logits_index`` [B] indexes it.
    """
    model = nnx.merge(graphdef, state)
    unpack, pack, query_positions = packing if packing is not None else (None, None, None)
    cache = PagedKVCache(k=k, v=v, page_tables=tables, slots=slots, positions=positions,
                         lengths=lengths, layer_groups=layer_groups, unpack=unpack, pack=pack,
                         query_positions=query_positions)
    last_hidden = None
    if packing is None:
        logits, cache = model(tokens, cache=cache, attn_impl=attn_impl, logits_index=logits_index)
        logits = logits[:, 0]
    else:  # logits of each sequence's last token only: [B, D] rows of the packed hidden states
        _, cache, hidden = model(tokens, cache=cache, attn_impl=attn_impl,
                                 logits_index=jnp.zeros((1,), jnp.int32), return_hidden=True)
        last_hidden = hidden[0][logits_index]
        logits = model.logits(last_hidden[None])[0]
    out = sample_tokens(logits, sp, flags)
    if flags.hidden and last_hidden is not None:
        out = (*out, last_hidden.astype(jnp.float32))
    return out, cache.k, cache.v


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
    """

    def __init__(self, model: Transformer, kv_manager: KVCacheManager, *, attn_impl: str = "auto",
                 cache_dtype: str | None = None, min_batch: int = 8, min_table_pages: int = 16):
        cfg = model.config
        self.config = cfg
        self.graphdef, self.state = nnx.split(model)
        self.attn_impl = attn_impl
        self.page_size = kv_manager.page_size
        self.layer_groups = KVCacheManager.group_of_layer(cfg.layer_types)
        if len(kv_manager.groups) != max(self.layer_groups) + 1:
            raise ValueError(f"kv_manager has {len(kv_manager.groups)} page groups; the model's layer "
                             f"types {sorted(set(cfg.layer_types))} need {max(self.layer_groups) + 1}")
        self.num_pages = tuple(g.pool.num_pages for g in kv_manager.groups)
        self.k, self.v = PagedKVCache.create_pages(cfg, self.num_pages, self.page_size,
                                                   self.layer_groups, cache_dtype)
        self.min_batch, self.min_table_pages = min_batch, min_table_pages
        self.num_steps = 0  # jitted calls run

    @property
    def kv_bytes(self) -> int:
        """Bytes of all K/V page arrays (int8 values and their scales when quantized)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v))))

    def kv_bytes_per_token(self) -> float:
        """K/V bytes one cached token takes over all layers (page arrays / page slots)."""
        total = 0.0
        for layer, g in enumerate(self.layer_groups):
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
        decodes = [e for e in output.scheduled if len(e.token_ids) == 1]
        prefills = [e for e in output.scheduled if len(e.token_ids) > 1]
        results: dict[str, SampleOutput] = {}
        if prefills:
            t = _length_bucket(max(len(e.token_ids) for e in prefills))
            results.update(self._run(prefills, t, masks))
        if decodes:
            results.update(self._run(decodes, 1, masks))
        return results

    def _run(self, entries: list[ScheduledRequest], t: int, masks) -> dict[str, SampleOutput]:
        n = len(entries)
        b = _pow2(n, self.min_batch)
        G = self.page_size
        m = _pow2(max(len(e.page_tables[0]) for e in entries), self.min_table_pages)
        n_groups = len(self.num_pages)
        tokens = np.zeros((b, t), np.int32)
        positions = np.full((b, t), -1, np.int32)
        lengths = np.zeros((b,), np.int32)
        logits_index = np.zeros((b,), np.int32)
        tables = np.full((n_groups, b, m), -1, np.int32)
        slots = np.full((n_groups, b, t), -1, np.int32)
        for i, e in enumerate(entries):
            k = len(e.token_ids)
            pos = e.start_position + np.arange(k)
            tokens[i, :k] = e.token_ids
            positions[i, :k] = pos
            lengths[i] = e.start_position + k
            logits_index[i] = k - 1
            for g, table in enumerate(e.page_tables):
                table = np.asarray(table, np.int32)
                tables[g, i, :len(table)] = table
                slots[g, i, :k] = table[pos // G] * G + pos % G
        packing = None
        if t > 1:
            # Pack the real tokens into one row so projections and MLPs skip the padding.
            real = positions >= 0  # [B, T]
            total = int(real.sum())
            n_packed = _length_bucket(total)
            flat = np.flatnonzero(real.reshape(-1))  # packed token j sits at flat index flat[j]
            unpack = np.full((b * t,), n_packed, np.int32)
            unpack[flat] = np.arange(total, dtype=np.int32)
            pack = np.zeros((n_packed,), np.int32)
            pack[:total] = flat
            row_start = np.concatenate([[0], np.cumsum(real.sum(1))[:-1]]).astype(np.int32)
            logits_index = np.where(lengths > 0, row_start + logits_index, 0).astype(np.int32)
            packing = (jnp.asarray(unpack.reshape(b, t)), jnp.asarray(pack), jnp.asarray(positions))
            pack_row = lambda x, fill: np.concatenate(  # noqa: E731
                [x.reshape(*x.shape[:-2], -1)[..., flat],
                 np.full((*x.shape[:-2], n_packed - total), fill, np.int32)], -1)[..., None, :]
            tokens, positions, slots = pack_row(tokens, 0), pack_row(positions, -1), pack_row(slots, -1)
        sp, flags = self._sampling_inputs(entries, b, masks)
        outs, self.k, self.v = _step(
            self.graphdef, self.layer_groups, self.attn_impl, flags, self.state, self.k, self.v,
            jnp.asarray(tokens), tuple(jnp.asarray(x) for x in tables),
            tuple(jnp.asarray(x) for x in slots), jnp.asarray(positions), jnp.asarray(lengths),
            jnp.asarray(logits_index), sp, packing)
        self.num_steps += 1
        tok, lp, top_ids, top_lp = outs[:4]
        hidden = np.asarray(outs[4]) if len(outs) > 4 else None
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
            p["out_index"][i] = r.num_output_tokens
            p["repetition"][i], p["frequency"][i], p["presence"][i] = (
                sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
            penalties |= (sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0
                          or sp.presence_penalty != 0.0)
            masked |= e.request_id in masks
            logprobs |= sp.logprobs
        sampling = bool((p["temperature"] > 0).any())
        if masked:
            mask = np.full((b, words), -1, np.int32)
            for i, e in enumerate(entries):
                if e.samples and e.request_id in masks:
                    mask[i] = masks[e.request_id]
            p["mask"] = mask
        if penalties:
            hist_len = _pow2(max(e.request.num_tokens for e in entries), 16)
            history = np.full((b, hist_len), -1, np.int32)
            is_output = np.zeros((b, hist_len), bool)
            for i, e in enumerate(entries):
                ids = e.request.all_token_ids
                history[i, :len(ids)] = ids
                is_output[i, e.request.num_prompt_tokens:len(ids)] = True
            p["history"], p["history_is_output"] = history, is_output
        hidden = any(e.samples and e.request.wants_hidden and len(e.token_ids) > 1 for e in entries)
        flags = _Flags(sampling=sampling, penalties=penalties, masked=masked, logprobs=logprobs,
                       hidden=hidden)
        return {k: jnp.asarray(v) for k, v in p.items()}, flags
