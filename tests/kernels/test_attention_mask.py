"""Block classification: EMPTY and FULL claims are exact, PARTIAL only where needed."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from model.kernels.mask import (EMPTY, FULL, PARTIAL, MaskDescription, block_lists,
                                classify_blocks, skipped_fraction)


def _dense_blocks(dense, bq, bk):
    b, t, s = dense.shape
    blocks = np.asarray(dense).reshape(b, t // bq, bq, s // bk, bk)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


@st.composite
def descriptions(draw):
    b = draw(st.integers(1, 2))
    t = 8 * draw(st.integers(1, 4))
    s = 8 * draw(st.integers(1, 5))
    start = draw(st.integers(0, 16))
    kv_pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    holes = draw(st.lists(st.integers(0, s - 1), max_size=4))
    kv_pos[:, holes] = -1  # empty cache slots
    q_pos = np.broadcast_to(start + np.arange(t), (b, t)).copy()
    segments = draw(st.booleans())
    spans = draw(st.booleans())
    ids = lambda n: np.sort(np.asarray(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))))
    qseg = kvseg = qspan = kvspan = None
    if segments:
        qseg, kvseg = np.stack([ids(t)] * b), np.stack([ids(s)] * b)
    if spans:
        qspan, kvspan = np.stack([ids(t)] * b), np.stack([ids(s)] * b)
    return MaskDescription(q_pos.astype(np.int32), kv_pos.astype(np.int32),
                           causal=draw(st.booleans()),
                           window=draw(st.one_of(st.none(), st.integers(1, 40))),
                           q_segment_ids=qseg, kv_segment_ids=kvseg, q_span_ids=qspan,
                           kv_span_ids=kvspan)


@settings(max_examples=30, deadline=None)
@given(mask=descriptions(), traced=st.booleans())
def test_block_kinds_are_sound(mask, traced):
    """EMPTY blocks hold no visible pair, FULL blocks only visible pairs (NumPy and jnp paths)."""
    if traced:
        import dataclasses
        mask = dataclasses.replace(mask, **{f.name: jnp.asarray(getattr(mask, f.name))
                                             for f in dataclasses.fields(mask)
                                             if isinstance(getattr(mask, f.name), np.ndarray)})
    kinds = np.asarray(classify_blocks(mask, 8, 8))
    anyv, allv = _dense_blocks(mask.dense(), 8, 8)
    assert not (anyv & (kinds == EMPTY)).any()
    assert (allv[kinds == FULL]).all()


def test_static_causal_blocks_are_exact():
    """Plain causal at default positions: below-diagonal FULL, diagonal PARTIAL, above EMPTY."""
    pos = np.arange(64, dtype=np.int32)[None]
    kinds = classify_blocks(MaskDescription(pos, pos, causal=True), 16, 16)
    assert isinstance(kinds, np.ndarray)  # concrete description: computed at trace time
    i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    expected = np.where(j < i, FULL, np.where(j == i, PARTIAL, EMPTY))
    np.testing.assert_array_equal(kinds[0], expected)


def test_window_skips_most_blocks():
    """A 64-token window over 1024 tokens leaves only a diagonal band of blocks."""
    pos = np.arange(1024, dtype=np.int32)[None]
    kinds = classify_blocks(MaskDescription(pos, pos, causal=True, window=64), 64, 64)
    # Per query block: the diagonal block and the one before it; everything else is skipped.
    assert ((kinds != EMPTY).sum(-1) <= 2).all()
    assert skipped_fraction(kinds) > 0.85


def test_block_lists_put_each_kind_first():
    kinds = np.array([[[FULL, EMPTY, PARTIAL, FULL, PARTIAL]]], np.int32)
    lists = block_lists(kinds, pad_to=8)
    np.testing.assert_array_equal(lists.counts[0, 0], [2, 2])
    np.testing.assert_array_equal(lists.full[0, 0, :2], [0, 3])
    np.testing.assert_array_equal(lists.partial[0, 0, :2], [2, 4])
    assert lists.full.shape[-1] == lists.partial.shape[-1] == 8


@pytest.mark.parametrize("t_pad,s_pad", [(24, 40)])
def test_padding_adds_no_visible_pairs(t_pad, s_pad):
    """Padded keys are empty slots; padded queries repeat the last one (bounds do not widen)."""
    pos = np.arange(20, dtype=np.int32)[None]
    padded = MaskDescription(pos, pos, causal=True, window=5).padded(t_pad, s_pad)
    dense = np.asarray(padded.dense())
    assert not dense[:, :, 20:].any()
    np.testing.assert_array_equal(dense[:, 20:], np.repeat(dense[:, 19:20], t_pad - 20, axis=1))
