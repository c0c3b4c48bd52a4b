"""Training progress: a one-line progress bar (loss, tokens/s, MFU, ETA) and metrics as JSONL."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import IO, Any

# Dense bf16 peak FLOP/s per device, by substrings of ``jax.Device.device_kind``.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("gh200", 989e12),
    ("b200", 2250e12), ("a100", 312e12), ("l40s", 362e12), ("a10", 125e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus attention's 12 x L x T x N x H."""
    c = model_cfg
    matmul_params = c.num_params - (0 if c.tie_embeddings else c.vocab_size * c.hidden_size)
    return 6.0 * matmul_params + 12.0 * c.num_layers * seq_len * c.num_heads * c.head_dim


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLogger:
    """Writes one JSON object per logged step and redraws a progress line.

    Tokens/s, MFU and ETA are measured from the end of the first step of this process, so that
    compilation does not count.
    """

    def __init__(self, *, total_steps: int, start_step: int, tokens_per_step: int,
                 flops_per_step: float, peak_flops_total: float | None,
                 jsonl_path: str | pathlib.Path | None, enabled: bool = True,
                 stream: IO[str] | None = None, width: int = 24):
        self.total, self.start = total_steps, start_step
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak = peak_flops_total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.jsonl = None
        if enabled and jsonl_path is not None:
            path = pathlib.Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = path.open("a")
        self.t0: float | None = None
        self.step0 = start_step
        self.last: tuple[int, float] | None = None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Records ``metrics`` for ``step``; returns the record written."""
        now = time.perf_counter()
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self.t0 is None:
            self.t0, self.step0 = now, step
            tps = mfu = eta = None
        else:
            elapsed = now - self.t0
            steps = step - self.step0
            rate = steps / elapsed if elapsed > 0 else float("inf")
            tps = self.tokens_per_step * rate
            mfu = self.flops_per_step * rate / self.peak if self.peak else None
            eta = (self.total - step) / rate if rate > 0 else float("inf")
        step_time = (now - self.last[1]) / (step - self.last[0]) if self.last else None
        self.last = (step, now)
        record.update(tokens_per_s=tps, mfu=mfu, eta_s=eta, step_time_s=step_time, time=time.time())
        if not self.enabled:
            return record
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self._draw(step, record)
        return record

    def _draw(self, step: int, r: dict[str, Any]) -> None:
        done = int(self.width * step / self.total)
        bar = "=" * done + " " * (self.width - done)
        parts = [f"step {step}/{self.total} [{bar}] loss {r['loss']:.4f}"]
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] is not None else "- tok/s")
        parts.append(f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a")
        parts.append(f"ETA {format_duration(r['eta_s'])}" if r["eta_s"] is not None else "ETA ?")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a metrics file (a resumed run appends; later records of a step win)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
