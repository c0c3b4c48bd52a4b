"""Block-sparse flash attention: padding, block metadata, the pallas_calls and the custom VJP.

``flash_attention`` pads T and S up to the block sizes (Triton's ``mha`` is wrong on ragged
sequences, jax#27224, and Triton blocks must be powers of two), classifies blocks with
``mask.classify_blocks``, compacts them into lists, and runs three Pallas kernels
(``flash_kernels``): the forward pass, and under ``jax.custom_vjp`` (``jax.grad`` through a bare
``pallas_call`` fails) a dq kernel and a dk/dv kernel that skip the same EMPTY blocks. Softmax
statistics, accumulators and the log-sum-exp are float32 whatever the input dtype.

Grids: forward and dq run one program per (batch, query head, query block); dk/dv one per
(batch, kv head, key block), looping over the N/K query heads of its group so GQA needs no
repeat of K/V and no reduction afterwards. No grid shrinking is needed (splash shrinks its grid
because a TPU grid step costs even when skipped): each program's loop runs only over its
non-empty blocks. On GPU (Triton): H, N/K and the block sizes must be powers of two, blocks >= 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from model.kernels import flash_kernels
from model.kernels.mask import MaskDescription, MaskKind, block_lists, classify_blocks


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: the custom VJP's non-differentiable arg)."""

    kind: MaskKind
    n_mask: int
    scale: float
    soft_cap: float | None
    bq: int
    bk: int
    groups: int
    interpret: bool


def _compiler_params(cfg: _Config):
    """Triton parameters on GPU: they also select the Triton lowering, where pallas_call would
    otherwise pick Mosaic GPU (whose SMEM-resident blocks cannot hold a whole K/V sequence)."""
    if cfg.interpret or jax.default_backend() == "tpu":
        return None
    return triton_params(num_warps=4 if cfg.bq * cfg.bk <= 64 * 64 else 8, num_stages=2)


def triton_params(**kw):
    from jax.experimental.pallas import triton as pltriton  # imported only off-TPU
    return pltriton.CompilerParams(**kw)


def _common_specs(cfg: _Config, tp: int, sp: int, lists_len: int, h: int):
    """BlockSpecs shared by the query-major kernels (forward, dq): grid (B, N, T / bq)."""
    g = cfg.groups
    q_spec = pl.BlockSpec((None, cfg.bq, None, h), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, sp, None, h), lambda b, n, i: (b, 0, n // g, 0))
    row_spec = pl.BlockSpec((None, None, cfg.bq), lambda b, n, i: (b, n, i))
    qm_spec = pl.BlockSpec((None, cfg.bq), lambda b, n, i: (b, i))
    km_spec = pl.BlockSpec((None, sp), lambda b, n, i: (b, 0))
    list_spec = pl.BlockSpec((None, None, lists_len), lambda b, n, i: (b, i, 0))
    count_spec = pl.BlockSpec((None, None, 2), lambda b, n, i: (b, i, 0))
    return q_spec, kv_spec, row_spec, qm_spec, km_spec, list_spec, count_spec


def _forward(cfg: _Config, q, k, v, qm, km, fwd_lists):
    b, tp, n, h = q.shape
    sp = k.shape[1]
    full, part, counts = fwd_lists
    q_spec, kv_spec, row_spec, qm_spec, km_spec, list_spec, count_spec = _common_specs(
        cfg, tp, sp, full.shape[-1], h)
    kernel = functools.partial(flash_kernels.forward_kernel, kind=cfg.kind, n_mask=cfg.n_mask,
                               scale=cfg.scale, soft_cap=cfg.soft_cap, bk=cfg.bk)
    return pl.pallas_call(
        kernel,
        grid=(b, n, tp // cfg.bq),
        in_specs=[q_spec, kv_spec, kv_spec] + [qm_spec] * cfg.n_mask + [km_spec] * cfg.n_mask
        + [list_spec, list_spec, count_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="kestrel_flash_fwd",
    )(q, k, v, *qm, *km, full, part, counts)


def _dq(cfg: _Config, q, k, v, do, lse, di, qm, km, fwd_lists):
    b, tp, n, h = q.shape
    sp = k.shape[1]
    full, part, counts = fwd_lists
    q_spec, kv_spec, row_spec, qm_spec, km_spec, list_spec, count_spec = _common_specs(
        cfg, tp, sp, full.shape[-1], h)
    kernel = functools.partial(flash_kernels.dq_kernel, kind=cfg.kind, n_mask=cfg.n_mask,
                               scale=cfg.scale, soft_cap=cfg.soft_cap, bk=cfg.bk)
    return pl.pallas_call(
        kernel,
        grid=(b, n, tp // cfg.bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + [qm_spec] * cfg.n_mask
        + [km_spec] * cfg.n_mask + [list_spec, list_spec, count_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="kestrel_flash_dq",
    )(q, k, v, do, lse, di, *qm, *km, full, part, counts)


def _dkv(cfg: _Config, q, k, v, do, lse, di, qm, km, bwd_lists):
    b, tp, n, h = q.shape
    sp, kh = k.shape[1], k.shape[2]
    g = cfg.groups
    full, part, counts = bwd_lists
    group_spec = pl.BlockSpec((None, tp, g, h), lambda b_, k_, j: (b_, 0, k_, 0))
    kv_spec = pl.BlockSpec((None, cfg.bk, None, h), lambda b_, k_, j: (b_, j, k_, 0))
    rows_spec = pl.BlockSpec((None, g, tp), lambda b_, k_, j: (b_, k_, 0))
    qm_spec = pl.BlockSpec((None, tp), lambda b_, k_, j: (b_, 0))
    km_spec = pl.BlockSpec((None, cfg.bk), lambda b_, k_, j: (b_, j))
    list_spec = pl.BlockSpec((None, None, full.shape[-1]), lambda b_, k_, j: (b_, j, 0))
    count_spec = pl.BlockSpec((None, None, 2), lambda b_, k_, j: (b_, j, 0))
    kernel = functools.partial(flash_kernels.dkv_kernel, kind=cfg.kind, n_mask=cfg.n_mask,
                               scale=cfg.scale, soft_cap=cfg.soft_cap, bq=cfg.bq, groups=g)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, sp // cfg.bk),
        in_specs=[group_spec, kv_spec, kv_spec, group_spec, rows_spec, rows_spec]
        + [qm_spec] * cfg.n_mask + [km_spec] * cfg.n_mask + [list_spec, list_spec, count_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="kestrel_flash_dkv",
    )(q, k, v, do, lse, di, *qm, *km, full, part, counts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qm, km, fwd_lists, bwd_lists):
    return _forward(cfg, q, k, v, qm, km, fwd_lists)


def _flash_fwd(cfg, q, k, v, qm, km, fwd_lists, bwd_lists):
    o, lse = _forward(cfg, q, k, v, qm, km, fwd_lists)
    return (o, lse), (q, k, v, qm, km, fwd_lists, bwd_lists, o, lse)


def _flash_bwd(cfg, res, cotangents):
    q, k, v, qm, km, fwd_lists, bwd_lists, o, lse = res
    do, dlse = cotangents  # [B, T, N, H], [B, N, T]
    # d(lse)/d(logits) = p, so a cotangent on the lse folds into di: ds = p * (dp - (di - dlse)).
    di = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    # Rows that saw no key have lse = -inf; +inf makes exp(s - lse) = 0 there instead of NaN.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    do = do.astype(q.dtype)
    dq = _dq(cfg, q, k, v, do, lse, di, qm, km, fwd_lists)
    dk, dv = _dkv(cfg, q, k, v, do, lse, di, qm, km, bwd_lists)
    none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731  (integer inputs)
    return dq, dk, dv, none(qm), none(km), none(fwd_lists), none(bwd_lists)


_flash.defvjp(_flash_fwd, _flash_bwd)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Block sizes, padded lengths and the block-kind table of one call (for benchmarks/tests)."""

    bq: int
    bk: int
    t_pad: int
    s_pad: int
    kinds: jax.Array | np.ndarray  # [B, T_pad / bq, S_pad / bk]


def plan_blocks(mask: MaskDescription, t: int, s: int, block_q: int = 128,
                block_k: int = 128) -> tuple[BlockPlan, MaskDescription]:
    """Block sizes (powers of two, capped by the lengths), padding and block kinds for a mask."""
    bq = min(next_pow2(block_q), max(16, next_pow2(t)))
    bk = min(next_pow2(block_k), max(16, next_pow2(s)))
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    padded = mask.padded(tp, sp)
    return BlockPlan(bq, bk, tp, sp, classify_blocks(padded, bq, bk)), padded


def flash_attention(q, k, v, mask: MaskDescription, *, scale: float, soft_cap: float | None = None,
                    block_q: int = 128, block_k: int = 128, interpret: bool = False):
    """Block-sparse attention; inputs are assumed checked (``attention.check_inputs``).

    Args:
      q: [B, T, N, H]. k, v: [B, S, K, H], N a multiple of K.
      mask: the mask description (arrays [B, T] / [B, S]).
      scale: logit scale. soft_cap: tanh cap on logits, or None.
      block_q, block_k: block sizes (rounded to powers of two, capped by T and S, at least 16).
      interpret: run the Pallas kernels in interpret mode (CPU).

    Returns:
      (out [B, T, N, H] in q's dtype, lse [B, T, N] float32; -inf on rows that see no key).
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    plan, padded = plan_blocks(mask, t, s, block_q, block_k)
    fwd = block_lists(plan.kinds, pad_to=next_pow2(plan.kinds.shape[2]))
    bwd = block_lists(plan.kinds.transpose(0, 2, 1), pad_to=next_pow2(plan.kinds.shape[1]))
    qm = tuple(jnp.asarray(a, jnp.int32) for a in padded.q_arrays())
    km = tuple(jnp.asarray(a, jnp.int32) for a in padded.kv_arrays())
    cfg = _Config(kind=mask.kind, n_mask=len(qm), scale=float(scale),
                  soft_cap=None if soft_cap is None else float(soft_cap), bq=plan.bq, bk=plan.bk,
                  groups=n // kh, interpret=bool(interpret))
    pad_t = ((0, 0), (0, plan.t_pad - t), (0, 0), (0, 0))
    pad_s = ((0, 0), (0, plan.s_pad - s), (0, 0), (0, 0))
    as_jnp = lambda lists: (jnp.asarray(lists.full), jnp.asarray(lists.partial),  # noqa: E731
                            jnp.asarray(lists.counts))
    out, lse = _flash(cfg, jnp.pad(q, pad_t), jnp.pad(k, pad_s), jnp.pad(v, pad_s), qm, km,
                      as_jnp(fwd), as_jnp(bwd))
    return out[:, :t], lse[:, :, :t].transpose(0, 2, 1)
