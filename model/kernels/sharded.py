"""The attention kernels under a device mesh, through ``jax.shard_map``.

Pallas kernels cannot be auto-partitioned by XLA, so they run per shard: batch over one mesh
axis, heads over another (query heads and kv heads split by the same factor, which keeps each GQA
group on one shard). Attention never mixes batch rows or heads, so no collective is needed.
``check_vma=False`` because pallas_call does not declare how its outputs vary (jax#21855).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from model.kernels.attention import attention
from model.kernels.paged import paged_attention

_ID_ARGS = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids", "q_span_ids",
            "kv_span_ids")


Axes = str | tuple[str, ...] | None
# sharding/rules.py's names: the batch splits over data and fsdp, heads over tensor.
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def _present(mesh: Mesh, axes: Axes) -> tuple[str, ...] | None:
    """The named axes that this mesh has (a missing axis means: not split that way)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes or None


def _axis_size(mesh: Mesh, axes: tuple[str, ...] | None) -> int:
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def sharded_attention(q, k, v, *, mesh: Mesh, batch_axis: Axes = BATCH_AXES,
                      head_axis: Axes = HEAD_AXES, **kwargs):
    """``attention`` with batch sharded over ``batch_axis`` and heads over ``head_axis``.

    Args:
      q: [B, T, N, H]. k, v: [B, S, K, H]. B must divide by the batch axis size, and N and K by
        the head axis size.
      mesh: the device mesh. batch_axis, head_axis: mesh axis names (one or several) to split
        batch and heads over; names the mesh lacks are ignored (None: not split).
      **kwargs: ``attention``'s keyword arguments (id arrays [B, T] / [B, S] are batch-sharded).

    Returns:
      What ``attention`` returns, sharded the same way.
    """
    batch_axis, head_axis = _present(mesh, batch_axis), _present(mesh, head_axis)
    nb, nh = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
    if q.shape[0] % nb:
        raise ValueError(f"batch {q.shape[0]} does not divide over mesh axis {batch_axis!r} ({nb})")
    if q.shape[2] % nh or k.shape[2] % nh:
        raise ValueError(f"heads N={q.shape[2]}, K={k.shape[2]} do not divide over mesh axis "
                         f"{head_axis!r} ({nh})")
    ids = {name: kwargs.pop(name) for name in _ID_ARGS if kwargs.get(name) is not None}
    kwargs = {name: value for name, value in kwargs.items() if name not in _ID_ARGS}
    heads = P(batch_axis, None, head_axis, None)
    out_specs = (heads, P(batch_axis, None, head_axis)) if kwargs.get("return_lse") else heads

    def local(q, k, v, ids):
        return attention(q, k, v, **ids, **kwargs)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, P(batch_axis)),
                       out_specs=out_specs, check_vma=False)
    return fn(q, k, v, ids)


def sharded_paged_attention(q, k_pages, v_pages, page_table, lengths, *, mesh: Mesh,
                            batch_axis: Axes = BATCH_AXES, head_axis: Axes = HEAD_AXES,
                            **kwargs):
    """``paged_attention`` with sequences over ``batch_axis`` and heads over ``head_axis``.

    Args:
      q: [B, T, N, H]. k_pages, v_pages: [K, P, G, H] (kv heads sharded, pages replicated over
        the batch axis). page_table: [B, max_pages]. lengths: [B].
      mesh, batch_axis, head_axis: as in ``sharded_attention``.
      **kwargs: ``paged_attention``'s keyword arguments.

    Returns:
      [B, T, N, H], sharded like q.
    """
    batch_axis, head_axis = _present(mesh, batch_axis), _present(mesh, head_axis)
    nb, nh = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
    if q.shape[0] % nb:
        raise ValueError(f"batch {q.shape[0]} does not divide over mesh axis {batch_axis!r} ({nb})")
    if q.shape[2] % nh or k_pages.shape[0] % nh:
        raise ValueError(f"heads N={q.shape[2]}, K={k_pages.shape[0]} do not divide over mesh "
                         f"axis {head_axis!r} ({nh})")
    heads = P(batch_axis, None, head_axis, None)
    pages = P(head_axis, None, None, None)

    def local(q, k_pages, v_pages, page_table, lengths):
        return paged_attention(q, k_pages, v_pages, page_table, lengths, **kwargs)

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(heads, pages, pages, P(batch_axis), P(batch_axis)),
                       out_specs=heads, check_vma=False)
    return fn(q, k_pages, v_pages, page_table, lengths)
