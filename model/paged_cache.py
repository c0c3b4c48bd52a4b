"""A paged KV cache view for one serving step: the attention layer writes into pages, then attends.

The serving engine keeps every layer's keys and values in pages, ``[K, P, G, H]`` per layer (the
layout of ``model/kernels/paged.py``); which pages belong to which sequence is decided by
``serve/kv_pages.py`` and arrives here as page tables. A ``PagedKVCache`` bundles, for one step of
B sequences of T (padded) new tokens each:

- the page arrays of every layer (updated and returned, so the caller can donate them),
- per layer group (global, sliding), the page tables ``[B, M]`` and the slot of each new token
  ``[B, T]`` (``page * G + offset``; -1 for padding tokens, whose K/V are dropped),
- the new tokens' positions ``[B, T]`` (-1 for padding) and each sequence's cache length ``[B]``
  after the step.

A sliding group's table may start at a later logical page than 0 (``table_offsets``, in tokens):
the runner hands it only the pages the window can still see, so a sliding layer's gather and
scores span ``W + T`` keys however long the sequence (attention masks are relative, and RoPE was
applied before the keys were stored, so shifting every key position by the offset is exact).
Released sliding-window pages that remain in a table read -1: they are clamped to page 0 and
hidden by the window mask. ``Transformer.__call__`` recognises this cache and hands each layer
``attend``, which scatters the new K/V into the pages and attends over them: decode steps (T = 1) and speculative
verification steps (T = 1 + drafts, each row's queries its last T positions, left-padded) go
through the paged decode kernel, packed prefill chunks gather their pages into a dense view for the attention entry
point (their queries sit at arbitrary, padded positions the paged kernel does not describe), or on
a CPU kv-head-major into ``grouped_attention``.

A model with a pointer (``model/pointer.py``) keeps one more entry after its layers' in ``k`` and
``v``: each slot's pointer key ``[1, P, G, P_dim]`` (float32) and the token id there
``[1, P, G, 1]`` (int32), in the pages of group 0 (the global group when there is one, see
``serve/kv_pages.py``), so they follow the sequence's pages, prefix-cache hits included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from model import kernels
from model.config import ModelConfig
from model.kernels.grouped import grouped_attention, runs_grouped
from model.kernels.paged import paged_attention
from model.kv_int8 import create_int8_pages, gather_pages, is_int8_pages, write_int8_pages
from model.layers import DTYPES
from model.pointer import allowed_positions, tokens_beside

# The page group that holds a pointer's keys and token ids: group 0, the global layers' pages
# (a pointer model has some, ``ModelConfig``; ``serve/kv_pages.py`` puts them first).
POINTER_GROUP = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Page arrays of every layer plus one step's page tables, slots and positions.

    Attributes:
      k, v: per layer, [K, P_g, G, H] pages (P_g: pages of the layer's group); with a pointer,
        then its keys (in ``k``) and token ids (in ``v``) as one more entry.
      page_tables: per group, [B, M] physical page of each logical page (-1: released).
      slots: per group, [B, T] flat slot ``page * G + offset`` of each new token (-1: padding).
      positions: [B, T] positions of the new tokens (-1: padding).
      lengths: [B] tokens in each sequence's cache after this step (new ones included).
      layer_groups: static, the page group of each layer.
      unpack: packed prefill only: [B, T] index of each (sequence, query) into the packed row of
        N tokens (N: padding). Projections and MLPs then run on ``[1, N]`` real tokens, with no
        per-sequence padding; only attention sees the ``[B, T]`` layout. ``positions`` and
        ``slots`` are then [1, N].
      pack: [N] index of each packed token into the flattened [B * T] layout.
      query_positions: [B, T] positions in the unpacked layout (-1: padding).
      span_ids: [B, T] (the unpacked layout) bidirectional span ids of the new tokens (image
        placeholders; 0 elsewhere), or None. Spans are whole within the step (the scheduler never
        ends a chunk inside one), so keys already in the cache need no span id: they precede every
        query of the step and are visible causally.
      table_offsets: per group, [B] position of the first key of each page table's column 0
        (a multiple of G; ``None``: every table starts at position 0).
    """

    k: tuple[Float[Array, "K P G H"], ...]  # or int8 QArrays (model/kv_int8.py)
    v: tuple[Float[Array, "K P G H"], ...]
    page_tables: tuple[Int[Array, "B M"], ...]
    slots: tuple[Int[Array, "B T"], ...]
    positions: Int[Array, "B T"]
    lengths: Int[Array, "B"]
    layer_groups: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    unpack: Int[Array, "B T"] | None = None
    pack: Int[Array, "N"] | None = None
    query_positions: Int[Array, "B T"] | None = None
    span_ids: Int[Array, "B T"] | None = None
    table_offsets: tuple[Int[Array, "B"], ...] | None = None

    @staticmethod
    def create_pages(cfg: ModelConfig, num_pages: tuple[int, ...], page_size: int,
                     layer_groups: tuple[int, ...], dtype: str | None = None):
        """Zeroed page arrays: per layer, k and v of [K, P_g, G, H] with P_g = num_pages[group].

        ``dtype`` ``int8`` gives int8 pages with per-(kv head, page) scales (``model/kv_int8.py``);
        otherwise a float dtype name, default the model's compute dtype.

        Returns:
          (k tuple, v tuple), one entry per layer, then the pointer's when the model has one.
        """
        if len(layer_groups) != cfg.num_layers:
            raise ValueError(f"layer_groups has {len(layer_groups)} entries for {cfg.num_layers} layers")
        shape = lambda g: (cfg.num_kv_heads, num_pages[g], page_size, cfg.head_dim)  # noqa: E731
        if dtype == "int8":
            zeros = lambda g: create_int8_pages(shape(g))  # noqa: E731
        elif (dtype or cfg.dtype) in DTYPES:
            zeros = lambda g: jnp.zeros(shape(g), DTYPES[dtype or cfg.dtype])  # noqa: E731
        else:
            raise ValueError(f"KV page dtype {dtype!r} is not supported; use int8 or one of "
                             f"{sorted(DTYPES)}")
        k, v = tuple(zeros(g) for g in layer_groups), tuple(zeros(g) for g in layer_groups)
        if cfg.pointer_dim:
            k += (jnp.zeros((1, num_pages[POINTER_GROUP], page_size, cfg.pointer_dim), jnp.float32),)
            v += (jnp.full((1, num_pages[POINTER_GROUP], page_size, 1), -1, jnp.int32),)
        return k, v

    def attend(self, layer: int, q: Float[Array, "B T N H"], k: Float[Array, "B T K H"],
               v: Float[Array, "B T K H"], *, window: int | None, scale: float | None,
               soft_cap: float | None, impl: str = "auto"):
        """Writes layer ``layer``'s new keys/values into its pages and attends q over them.

        Returns:
          ([B, T, N, H] attention output, (k pages, v pages) updated).
        """
        g = self.layer_groups[layer]
        k_pages, v_pages = self.store(layer, k, v)
        kh, p, page, h = k_pages.shape
        b, t = q.shape[:2]
        packed = self.unpack is not None
        table = jnp.maximum(self.page_tables[g], 0)  # released sliding pages: hidden by the window
        offset = (jnp.zeros_like(self.lengths) if self.table_offsets is None
                  else self.table_offsets[g])  # [B]
        lengths = self.lengths - offset  # keys in the table's span
        if packed:
            n_q = q.shape[1]
            q = jnp.take(q[0], self.unpack, axis=0, mode="fill", fill_value=0)  # [B, T, N, H]
            b, t = q.shape[:2]
        if not packed:  # decode (T = 1) or verification of drafts: the last T positions
            as_q = lambda x: x if is_int8_pages(x) else x.astype(q.dtype)  # noqa: E731
            out = paged_attention(q, as_q(k_pages), as_q(v_pages), table,
                                  jnp.maximum(lengths, 1), window=window, scale=scale,
                                  soft_cap=soft_cap, impl=impl)
        else:
            m = table.shape[1]
            # On a CPU (impl auto) the pages stay kv-head-major for grouped_attention.
            grouped = runs_grouped(impl)
            kd = gather_pages(k_pages, table, q.dtype, kv_major=grouped)
            vd = gather_pages(v_pages, table, q.dtype, kv_major=grouped)
            s = jnp.arange(m * page, dtype=jnp.int32)[None, :]
            kv_positions = jnp.where(s < lengths[:, None], s + offset[:, None], -1)
            q_positions = self.query_positions if packed else self.positions
            q_spans = kv_spans = None
            if self.span_ids is not None:
                # Each new token's span id also marks its key, at the key's position.
                q_spans = self.span_ids
                at = jnp.where(q_positions < 0, m * page, q_positions - offset[:, None])
                kv_spans = jnp.zeros((b, m * page), jnp.int32).at[
                    jnp.arange(b)[:, None], at].set(q_spans, mode="drop")
            if grouped:
                mask = kernels.mask_from_description(
                    q_positions, kv_positions, causal=True, window=window, q_segment_ids=None,
                    kv_segment_ids=None, q_span_ids=q_spans, kv_span_ids=kv_spans)
                out = grouped_attention(q, kd, vd, mask, soft_cap=soft_cap,
                                        scale=q.shape[-1] ** -0.5 if scale is None else scale)
            else:
                out = kernels.attention(q, kd, vd, q_positions=q_positions,
                                        kv_positions=kv_positions, causal=True, window=window,
                                        q_span_ids=q_spans, kv_span_ids=kv_spans, scale=scale,
                                        soft_cap=soft_cap, impl=impl)
        if packed:
            out = out.reshape(b * t, *out.shape[2:])[self.pack][None]  # [1, N, N_h, H]
            assert out.shape[1] == n_q
        return out, (k_pages, v_pages)

    def store(self, layer: int, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"]):
        """Writes layer ``layer``'s new keys/values into its pages at the step's slots.

        Returns:
          (k pages, v pages) updated.
        """
        g = self.layer_groups[layer] if layer < len(self.layer_groups) else POINTER_GROUP
        k_pages, v_pages = self.k[layer], self.v[layer]
        kh, p, page, h = k_pages.shape
        # Out-of-range slots are dropped by the scatter; -1 would wrap around to the last slot.
        slots = self.slots[g].reshape(-1)
        slots = jnp.where(slots < 0, p * page, slots)

        def write(pages, new):  # new [B, T, K, H] -> pages [K, P, G, H]
            if is_int8_pages(pages):
                return write_int8_pages(pages, slots, new.reshape(-1, kh, h))
            width = pages.shape[-1]  # a pointer's token ids: 1, beside its keys
            flat = pages.reshape(kh, p * page, width)
            new = new.astype(pages.dtype).reshape(-1, kh, width).transpose(1, 0, 2)  # [K, B*T, H]
            return flat.at[:, slots].set(new, mode="drop").reshape(kh, p, page, width)

        return write(k_pages, k), write(v_pages, v)

    def pointer_context(self, keys: Float[Array, "B T P"], token_ids: Int[Array, "B T"],
                        query_index: Int[Array, "B K"] | None):
        """Stores the new tokens' pointer keys and ids, then gathers each query's context.

        Args:
          keys, token_ids: of the step's new tokens, in its layout ([B, T], or [1, N] packed).
          query_index: the queries, indices into that layout's rows ([B, K]), or None: all.

        Returns:
          ((pointer key pages, token id pages) updated, (keys [R, S, P], the token after each
          [R, S], allowed [R, Q, S])): one context per row of the step (R = B, Q queries each) or, packed,
          one per query (R = queries, Q = 1); ``S`` spans the row's page table.
        """
        layer = len(self.k) - 1
        key_pages, id_pages = self.store(layer, keys[:, :, None, :], token_ids[:, :, None, None])
        table = jnp.maximum(self.page_tables[POINTER_GROUP], 0)  # [B, M]
        offset = (jnp.zeros_like(self.lengths) if self.table_offsets is None
                  else self.table_offsets[POINTER_GROUP])
        lengths = self.lengths
        if query_index is None:
            query_index = jnp.broadcast_to(jnp.arange(keys.shape[1])[None, :], keys.shape[:2])
        q_positions = jnp.take_along_axis(self.positions, query_index, axis=1)
        if self.unpack is not None:  # packed: each query's own row of page tables
            row = self.pack[query_index[0]] // self.unpack.shape[1]  # [Q]
            table, offset, lengths = table[row], offset[row], lengths[row]
            q_positions = q_positions.reshape(-1, 1)
        _, _, page, dim = key_pages.shape
        r, m = table.shape
        context_keys = key_pages[0][table].reshape(r, m * page, dim)
        context_ids = id_pages[0, :, :, 0][table].reshape(r, m * page)
        following = tokens_beside(context_ids)  # a table's pages hold positions in order
        s = jnp.arange(m * page, dtype=jnp.int32)[None, :]
        kv_positions = jnp.where(s < (lengths - offset)[:, None], s + offset[:, None], -1)
        allowed = allowed_positions(q_positions, kv_positions)
        return (key_pages, id_pages), (context_keys, following, allowed)

    def with_pages(self, k: tuple, v: tuple) -> "PagedKVCache":
        """The same step with the updated page arrays of every layer."""
        return dataclasses.replace(self, k=tuple(k), v=tuple(v))
