"""bench/attention.py runs end to end on CPU (``--quick``) and writes the JSON it promises."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "attention.py"


@pytest.mark.slow
def test_quick_bench_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attention.json"
    bench.main(["--quick", "--out", str(out), "--only", "window-fwd,decode"])
    report = json.loads(out.read_text())
    assert {"date", "machine", "results"} <= report.keys()
    assert report["machine"]["jax"]
    window, decode = report["results"]
    # A 32-token window over 256 tokens in 32-blocks skips most blocks; the FLOPs count only them.
    assert window["blocks_skipped"] > 0.7 and window["tflops"] > 0
    assert window["visible_pairs"] == sum(min(i + 1, 32) for i in range(256))
    assert decode["pallas_s"] > 0 and decode["bandwidth_bytes_per_s"] > 0
