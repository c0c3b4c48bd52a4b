"""Benchmark of Kestrel's attention kernels: block-sparse flash attention and paged decode.

Per case it reports the median time, TFLOP/s counting only unmasked work (FlashAttention's
convention: forward 4 * B * N * H * visible pairs, backward 2.5x that), the fraction of blocks the
kernel skips, and speed against the dense reference and against cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only). Decode cases report the
bytes of KV actually read per step and the achieved bandwidth as a fraction of the device's peak.

Usage:
  python bench/attention.py --quick                # tiny sizes, runs anywhere (CPU: interpret)
  python bench/attention.py --out bench/results/attention-h100.json   # GPU targets

GPU targets (H100, bf16, head dim 128): causal forward at 16K >= 60% of cuDNN; window 1024 at 32K
>= 8x faster than dense causal; decode at 32K > 70% of HBM bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.kernels import attention, paged_attention  # noqa: E402
from model.kernels.attention import default_positions  # noqa: E402
from model.kernels.flash import plan_blocks  # noqa: E402
from model.kernels.mask import EMPTY, MaskDescription  # noqa: E402

# Peak dense bf16 TFLOP/s and HBM bytes/s by device kind (DESIGN.md's rooflines; vendor sheets).
PEAKS = {
    "H100": (989.4e12, 3.35e12),
    "H200": (989.4e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def _peak(device_kind: str):
    for name, peak in PEAKS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None, None


def _time(fn, *args, repeats: int) -> float:
    """Median seconds per call after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _visible_pairs(t: int, s: int, causal: bool, window: int | None) -> int:
    """Unmasked (query, key) pairs at default positions (queries at the last T of S keys)."""
    q = np.arange(s - t, s)
    hi = np.minimum(q + 1, s) if causal else np.full(t, s)
    lo = np.zeros(t, np.int64) if window is None else np.maximum(q - window + 1, 0)
    return int(np.maximum(hi - lo, 0).sum())


def _try(fn):
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - a peer that cannot run (OOM, no cuDNN) is reported
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def bench_prefill(name, *, b, t, n, k, h, window, dtype, backward, repeats, block):
    """One prefill case: Pallas vs the dense reference (same mask) vs cuDNN."""
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, n, h), dtype)
    kk_ = jax.random.normal(kk, (b, t, k, h), dtype)
    vv = jax.random.normal(kv, (b, t, k, h), dtype)
    qp, kp = default_positions(b, t, t)
    plan, _ = plan_blocks(MaskDescription(qp, kp, True, window), t, t, block, block)
    pairs = _visible_pairs(t, t, True, window)
    flops = 4 * b * n * h * pairs * (2.5 if backward else 1.0)

    def make(impl, win=window):
        kw = dict(window=win, impl=impl)
        if impl == "pallas":
            kw.update(block_q=block, block_k=block)
        f = lambda q, k, v: attention(q, k, v, **kw)  # noqa: E731
        if backward:
            g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
            return jax.jit(g)
        return jax.jit(f)

    result = dict(name=name, kind="prefill-backward" if backward else "prefill-forward",
                  shape=dict(B=b, T=t, N=n, K=k, H=h), window=window, dtype=jnp.dtype(dtype).name,
                  blocks=dict(bq=plan.bq, bk=plan.bk),
                  blocks_skipped=float((np.asarray(plan.kinds) == EMPTY).mean()),
                  visible_pairs=pairs, flops=flops)
    pallas_s, err = _try(lambda: _time(make("pallas"), q, kk_, vv, repeats=repeats))
    result["pallas_s"], result["pallas_error"] = pallas_s, err
    result["tflops"] = flops / pallas_s / 1e12 if pallas_s else None
    peers = {"reference": lambda: make("reference")}
    if jax.default_backend() == "gpu":
        peers["cudnn"] = lambda: make("cudnn")
        if window is not None:
            peers["cudnn_dense_causal"] = lambda: make("cudnn", None)
            peers["reference_dense_causal"] = lambda: make("reference", None)
    for peer, build in peers.items():
        secs, err = _try(lambda: _time(build(), q, kk_, vv, repeats=repeats))
        result[f"{peer}_s"] = secs
        if err:
            result[f"{peer}_error"] = err
        result[f"speedup_vs_{peer}"] = secs / pallas_s if secs and pallas_s else None
    if "cudnn_s" in result and result["cudnn_s"] and pallas_s:
        result["fraction_of_cudnn"] = result["cudnn_s"] / pallas_s
    peak_flops, _ = _peak(jax.devices()[0].device_kind)
    if peak_flops and result["tflops"]:
        result["fraction_of_peak_flops"] = result["tflops"] * 1e12 / peak_flops
    return result


def bench_decode(name, *, b, length, n, k, h, page, window, dtype, repeats):
    """One decode step: paged Pallas (split-K) vs the gathered reference; achieved HBM bandwidth."""
    max_pages = -(-length // page)
    pool = b * max_pages
    kk, kv, kq = jax.random.split(jax.random.key(1), 3)
    k_pages = jax.random.normal(kk, (k, pool, page, h), dtype)
    v_pages = jax.random.normal(kv, (k, pool, page, h), dtype)
    q = jax.random.normal(kq, (b, 1, n, h), dtype)
    table = jnp.asarray(np.random.default_rng(0).permutation(pool).reshape(b, max_pages), jnp.int32)
    lengths = jnp.full((b,), length, jnp.int32)
    read_tokens = length if window is None else min(length, window + page)  # whole pages are read
    kv_bytes = 2 * b * k * read_tokens * h * jnp.dtype(dtype).itemsize
    result = dict(name=name, kind="decode", shape=dict(B=b, S=length, N=n, K=k, H=h, G=page),
                  window=window, dtype=jnp.dtype(dtype).name, kv_bytes_read=kv_bytes)
    for impl in ("pallas", "reference"):
        fn = jax.jit(lambda *a, impl=impl: paged_attention(*a, window=window, impl=impl))
        secs, err = _try(lambda: _time(fn, q, k_pages, v_pages, table, lengths, repeats=repeats))
        result[f"{impl}_s"] = secs
        if err:
            result[f"{impl}_error"] = err
    if result["pallas_s"]:
        result["bandwidth_bytes_per_s"] = kv_bytes / result["pallas_s"]
        _, peak_bw = _peak(jax.devices()[0].device_kind)
        result["fraction_of_peak_bandwidth"] = (
            result["bandwidth_bytes_per_s"] / peak_bw if peak_bw else None)
        if result["reference_s"]:
            result["speedup_vs_reference"] = result["reference_s"] / result["pallas_s"]
    return result


def cases(quick: bool):
    """(function, kwargs) per case: the GPU targets, or tiny twins of them with --quick."""
    if quick:
        dt, rep = jnp.float32, 3
        return [
            (bench_prefill, dict(name="causal-fwd", b=1, t=128, n=2, k=1, h=32, window=None,
                                 dtype=dt, backward=False, repeats=rep, block=32)),
            (bench_prefill, dict(name="window-fwd", b=1, t=256, n=2, k=1, h=32, window=32,
                                 dtype=dt, backward=False, repeats=rep, block=32)),
            (bench_prefill, dict(name="causal-bwd", b=1, t=128, n=2, k=1, h=32, window=None,
                                 dtype=dt, backward=True, repeats=rep, block=32)),
            (bench_decode, dict(name="decode", b=2, length=200, n=4, k=2, h=32, page=16,
                                window=None, dtype=dt, repeats=rep)),
        ]
    dt, rep = jnp.bfloat16, 10
    return [
        (bench_prefill, dict(name="causal-fwd-16k", b=1, t=16384, n=16, k=16, h=128, window=None,
                             dtype=dt, backward=False, repeats=rep, block=128)),
        (bench_prefill, dict(name="causal-bwd-16k", b=1, t=16384, n=16, k=16, h=128, window=None,
                             dtype=dt, backward=True, repeats=rep, block=128)),
        (bench_prefill, dict(name="window1024-fwd-32k", b=1, t=32768, n=16, k=8, h=128,
                             window=1024, dtype=dt, backward=False, repeats=rep, block=128)),
        (bench_decode, dict(name="decode-32k", b=8, length=32768, n=32, k=8, h=128, page=64,
                            window=None, dtype=dt, repeats=rep)),
        (bench_decode, dict(name="decode-32k-window4096", b=8, length=32768, n=32, k=8, h=128,
                            page=64, window=4096, dtype=dt, repeats=rep)),
    ]


def machine() -> dict:
    dev = jax.devices()[0]
    return dict(platform=jax.default_backend(), device_kind=dev.device_kind,
                device_count=jax.device_count(), host=platform.node(), cpu_count=os.cpu_count(),
                python=platform.python_version(), jax=jax.__version__,
                jaxlib=getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU: interpret mode)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output path "
                        "(default bench/results/attention-<platform>-<date>.json)")
    parser.add_argument("--only", default=None, help="comma-separated case names to run")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    results = []
    for fn, kw in cases(args.quick):
        if args.only and kw["name"] not in args.only.split(","):
            continue
        res = fn(**kw)
        results.append(res)
        print(json.dumps({key: val for key, val in res.items() if not key.endswith("_error")}),
              flush=True)
    report = dict(benchmark="attention", date=now.isoformat(), quick=args.quick,
                  machine=machine(), results=results,
                  note="CPU runs time Pallas interpret mode: proof the bench works, not speed.")
    out = args.out or Path(__file__).resolve().parent / "results" / (
        f"attention-{jax.default_backend()}-{now.strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
