"""The memory planner: what serving a model at a context and batch costs, before anything runs.

``plan_memory(cfg, context=200_000, batch=4)`` sizes, from the ModelConfig alone, everything the
engine allocates for that load, with the same page and bucket arithmetic the engine uses
(``serve/kv_pages.pages_held``, ``serve/buckets``), so a plan that fits is one the engine keeps:

- weights: parameters x their dtype;
- KV cache per page group: a global layer holds every page of a sequence, a sliding layer only the
  pages its window sees plus one prefill chunk (``2 K H`` values per token per layer);
- the working set of one step, the largest transient tensors of a layer (layers run one after
  another, so one layer's worth is live at a time): for a prefill chunk of T tokens, the packed
  projections and MLP ``[T, F]``, the dense gather of the keys each group's queries see ``[S, K,
  H]``, and, where attention materialises scores (the plain-jnp reference that CPUs run), the
  ``[N, T, S]`` logits and probabilities plus the ``[T, S]`` mask; for a decode step, the same for
  B one-token rows; plus the last tokens' ``[B, V]`` logits and the sampler's history;
- a total, compared with a budget: the accelerator's ``bytes_limit`` (``jax`` memory stats), else
  the host's available RAM, else what the caller says, times a utilisation fraction (vLLM's
  ``gpu_memory_utilization``).

``context`` is vLLM's ``max_model_len``: the most tokens one sequence holds, prompt and output
together. A plan that does not fit says by how much, and what would: the largest batch at that
context and the longest context at that batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from model.config import ModelConfig
from serve.buckets import (MIN_TABLE_PAGES, PREFILL_TILE, batch_rows, length_bucket, min_table_width,
                           pow2, table_bucket, tile_rows, tiles_pay)
from serve.kv_pages import pages_held

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
GiB = 1 << 30


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """The KV cache of one page group (all layers of one attention span).

    Attributes:
      kind: ``global`` or ``sliding``, or ``pointer`` (a pointer's keys and token ids, kept in
        the first group's pages, ``model/pointer.py``).
      num_layers: layers in the group.
      window: W of a sliding group, else None.
      bytes_per_token_per_layer: ``2 K H`` x the cache dtype's size.
      pages_per_sequence: most pages one sequence holds at once.
      num_pages: pages for the whole batch (the pool the engine allocates).
      bytes: the group's KV cache, all its layers, whole batch.
    """

    kind: str
    num_layers: int
    window: int | None
    bytes_per_token_per_layer: int
    pages_per_sequence: int
    num_pages: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What serving ``batch`` sequences of ``context`` tokens costs; see the module docstring.

    All sizes in bytes. ``prefill`` and ``decode`` break the working sets down by tensor.
    """

    context: int
    batch: int
    max_output: int
    page_size: int
    prefill_chunk: int
    kv_cache_dtype: str
    materialized_scores: bool
    weights: int
    groups: tuple[GroupPlan, ...]
    prefill: dict[str, int]
    decode: dict[str, int]
    budget: int | None
    budget_source: str
    utilization: float

    @property
    def kv_cache(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def kv_cache_per_sequence(self) -> int:
        return self.kv_cache // self.batch

    @property
    def working_set(self) -> int:
        """The larger of one prefill step's and one decode step's transient tensors."""
        return max(sum(self.prefill.values()), sum(self.decode.values()))

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working_set

    @property
    def usable(self) -> int | None:
        return None if self.budget is None else int(self.budget * self.utilization)

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    @property
    def shortfall(self) -> int:
        """Bytes over the usable budget (0 when it fits)."""
        return 0 if self.fits else self.total - self.usable

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(kv_cache=self.kv_cache, working_set=self.working_set, total=self.total,
                   usable=self.usable, fits=self.fits, shortfall=self.shortfall)
        return out


def detect_budget() -> tuple[int | None, str]:
    """(bytes, where they come from): the first device's memory limit, else available host RAM."""
    try:
        import jax

        device = jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.platform} device memory ({device.device_kind})"
    except Exception:  # no backend at all: fall through to the host's RAM
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host RAM"
    except (ValueError, OSError):
        return None, "unknown (give --memory)"


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def plan_memory(cfg: ModelConfig, *, context: int, batch: int = 1, max_output: int | None = None,
                page_size: int = 16, prefill_chunk: int = 512, kv_cache_dtype: str | None = None,
                materialized_scores: bool | None = None, budget: int | None = None,
                budget_source: str = "given", utilization: float = 0.9,
                min_batch: int = 8, min_table_pages: int = MIN_TABLE_PAGES,
                prefill_tile: int | None = PREFILL_TILE) -> MemoryPlan:
    """Sizes serving ``batch`` sequences of up to ``context`` tokens of model ``cfg``.

    Args:
      cfg: the model.
      context: most tokens one sequence holds, prompt plus output (vLLM's ``max_model_len``).
      batch: sequences held at once (``max_num_seqs``).
      max_output: most output tokens of one request (<= context; default: context // 2). The
        longest prompt is ``context - max_output``.
      page_size: G, tokens per KV page.
      prefill_chunk: most tokens one request prefills per step.
      kv_cache_dtype: the pages' dtype (default: the model's compute dtype).
      materialized_scores: attention builds the ``[N, T, S]`` scores (the plain-jnp reference,
        which CPUs run); default: whether this machine's ``auto`` attention is the reference.
      budget: bytes available (None: unbounded; see ``detect_budget``).
      budget_source: where ``budget`` comes from, for the report.
      utilization: the fraction of ``budget`` the plan may use.
      min_batch: the runner's smallest decode batch bucket.
      prefill_tile: the runner's query tokens per prefill row (None: a row per sequence).
      min_table_pages: the runner's smallest page-table width bucket.

    Raises:
      ValueError: a bad argument, named.
    """
    _positive("context", context)
    _positive("batch", batch)
    _positive("page_size", page_size)
    _positive("prefill_chunk", prefill_chunk)
    max_output = max(1, context // 2) if max_output is None else max_output
    _positive("max_output", max_output)
    if max_output > context:
        raise ValueError(f"max_output ({max_output}) cannot exceed the context ({context}): the "
                         f"context counts prompt and output tokens together")
    kv_dtype = cfg.dtype if kv_cache_dtype in (None, "auto") else kv_cache_dtype
    if kv_dtype not in _ITEMSIZE:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(_ITEMSIZE)}, got {kv_dtype!r}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if materialized_scores is None:
        from model.kernels.attention import resolve_impl

        materialized_scores = resolve_impl("auto") == "reference"

    act = _ITEMSIZE[cfg.dtype]
    d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    G = page_size
    chunk = min(prefill_chunk, context)
    stored = max(1, context - 1)  # the last sampled token is never fed back
    groups = []
    for kind in ("global", "sliding"):
        layers = sum(t == kind for t in cfg.layer_types)
        if not layers:
            continue
        window = cfg.sliding_window if kind == "sliding" else None
        per_token = 2 * k * h * _ITEMSIZE[kv_dtype]
        if kv_dtype == "int8":  # one float32 scale per page and KV head, for K and V
            per_token += -(-2 * k * 4 // G)
        pages = pages_held(stored, window, chunk, G)
        groups.append(GroupPlan(kind, layers, window, per_token, pages, pages * batch,
                                pages * batch * G * per_token * layers))

    if cfg.pointer_dim:  # its keys (float32) and token ids (int32), in the first group's pages
        first = groups[0]
        per_token = cfg.pointer_dim * 4 + 4
        groups.append(GroupPlan("pointer", 1, first.window, per_token, first.pages_per_sequence,
                                first.num_pages, first.num_pages * G * per_token))

    def keys_seen(window: int | None, t: int) -> int:
        """Keys one row's gather spans: its table's width bucket, in tokens."""
        pages = pages_held(stored, window, t, G)
        return table_bucket(pages, min_table_width(window, t, G, min_table_pages)) * G

    # Layers run one at a time: the widest group's gather and scores are the transient peak.
    t = length_bucket(chunk)  # packed tokens of one step
    s = max(keys_seen(g.window, t) for g in groups)
    # A step's chunk budget may be split over m sequences, each a row of bucket(chunk / m) query
    # slots, or cut into query tiles (at most chunk / tile + m of them); the worst split sets the
    # unpacked attention layout [B, T_row].
    def layout(m: int) -> tuple[int, int]:
        t_m = length_bucket(-(-chunk // m))
        rows = batch_rows(m, t_m, s, n * t_m + 2 * k * h, min_batch)
        if prefill_tile and prefill_tile < t_m:  # the runner's choice for m chunks of chunk / m
            tiled = tile_rows(m * -(-t_m // prefill_tile), min_batch)
            if tiles_pay(rows, t_m, tiled, prefill_tile, n, 2 * k * h):
                return tiled, prefill_tile
        return rows, t_m

    rows, t_row = max((layout(m) for m in range(1, min(batch, chunk) + 1)), key=lambda rt: rt[0] * rt[1])
    prefill = {
        "hidden and projections [T, D + (N + 2K) H]": t * (3 * d + (n + 2 * k) * h) * act,
        "MLP [T, 3F]": t * 3 * f * act,
        "dense K/V gather [B, S, 2K, H]": rows * s * 2 * k * h * act,
        "attention scores [B, N, T, S] x2 + mask": (rows * t_row * s * (2 * n * 4 + 1)
                                                    if materialized_scores else 0),
        "logits [B, V]": rows * v * 4 * 2,
    }
    s_dec = max(keys_seen(g.window, 1) for g in groups)
    b = batch_rows(batch, 1, s_dec, n + 2 * k * h, min_batch)
    decode = {
        "hidden and projections [B, D + (N + 2K) H]": b * (3 * d + (n + 2 * k) * h) * act,
        "MLP [B, 3F]": b * 3 * f * act,
        "dense K/V gather [B, S, 2K, H]": b * s_dec * 2 * k * h * act if materialized_scores else 0,
        "attention scores [B, N, S] x2": b * n * s_dec * 4 * 2 if materialized_scores else 0,
        "logits and sampler [B, V] x4": b * v * 4 * 4,
        "penalty history [B, L]": b * pow2(context, 16) * 5,
    }
    return MemoryPlan(
        context=context, batch=batch, max_output=max_output, page_size=G, prefill_chunk=chunk,
        kv_cache_dtype=kv_dtype, materialized_scores=materialized_scores,
        weights=cfg.num_params * _ITEMSIZE[cfg.param_dtype], groups=tuple(groups),
        prefill=prefill, decode=decode, budget=budget, budget_source=budget_source,
        utilization=utilization)


def _largest(fits, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with fits(x), for a monotone ``fits``; lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def max_batch(plan_kwargs: dict[str, Any], cfg: ModelConfig, limit: int = 1 << 20) -> int:
    """The most sequences of ``plan_kwargs['context']`` tokens that fit (0: not even one)."""
    kw = {k: x for k, x in plan_kwargs.items() if k != "batch"}
    return _largest(lambda b: plan_memory(cfg, batch=b, **kw).fits, 1, limit)


def max_context(plan_kwargs: dict[str, Any], cfg: ModelConfig, limit: int | None = None) -> int:
    """The longest context that fits at ``plan_kwargs['batch']`` (0: not even one token).

    The output share keeps its ratio to the context; the search stops at ``limit`` (default:
    the model's ``max_position_embeddings``).
    """
    kw = {k: x for k, x in plan_kwargs.items() if k not in ("context", "max_output")}
    ctx, out = plan_kwargs["context"], plan_kwargs.get("max_output")
    share = None if out is None else out / ctx

    def fits(c: int) -> bool:
        mo = None if share is None else max(1, min(c, round(c * share)))
        return plan_memory(cfg, context=c, max_output=mo, **kw).fits

    return _largest(fits, 1, limit or cfg.max_position_embeddings)


def describe(plan: MemoryPlan, cfg: ModelConfig) -> str:
    """The plan as a table, one line per item, then the verdict."""
    rows = [("weights", plan.weights, f"{cfg.num_params:,} parameters, {cfg.param_dtype}")]
    for g in plan.groups:
        span = "whole context" if g.window is None else f"window {g.window:,} + chunk {plan.prefill_chunk:,}"
        rows.append((f"KV cache, {g.kind} layers", g.bytes,
                     f"{g.num_layers} layer(s) x {g.pages_per_sequence:,} pages of {plan.page_size} "
                     f"x {plan.batch} seq; {g.bytes_per_token_per_layer} B/token/layer ({span})"))
    step = "prefill" if sum(plan.prefill.values()) >= sum(plan.decode.values()) else "decode"
    parts = plan.prefill if step == "prefill" else plan.decode
    detail = "; ".join(f"{name} {format_bytes(x)}" for name, x in parts.items() if x)
    rows.append((f"working set ({step} step)", plan.working_set, detail))
    rows.append(("total", plan.total, ""))
    if plan.budget is not None:
        rows.append(("budget", plan.usable, f"{plan.utilization:.0%} of {format_bytes(plan.budget)}, "
                                            f"{plan.budget_source}"))
    head = (f"context {plan.context:,} tokens (prompt <= {plan.context - plan.max_output:,} + output "
            f"<= {plan.max_output:,}), batch {plan.batch}, page {plan.page_size}, prefill chunk "
            f"{plan.prefill_chunk:,}, KV {plan.kv_cache_dtype}"
            f"{', scores materialised' if plan.materialized_scores else ''}")
    lines = [head] + [f"  {name:<28} {format_bytes(x):>10}  {note}".rstrip() for name, x, note in rows]
    return "\n".join(lines)


def verdict(plan: MemoryPlan, cfg: ModelConfig, plan_kwargs: dict[str, Any]) -> str:
    """One sentence: fits with how much to spare, or short by how much and what fits instead."""
    if plan.usable is None:
        return "no memory budget known: give one to check the plan"
    if plan.fits:
        return f"fits: {format_bytes(plan.usable - plan.total)} to spare"
    mb = max_batch(plan_kwargs, cfg)
    mc = max_context(plan_kwargs, cfg, limit=plan.context)
    at_ctx = (f"at context {plan.context:,} at most {mb} sequence(s) fit" if mb else
              f"not even one sequence of {plan.context:,} tokens fits")
    at_batch = (f"at batch {plan.batch} the context can be at most {mc:,} tokens" if mc else
                f"no context fits at batch {plan.batch}")
    return (f"does not fit: needs {format_bytes(plan.total)} but {format_bytes(plan.usable)} is usable "
            f"(short by {format_bytes(plan.shortfall)}); {at_ctx}; {at_batch}")
