"""bench/decode_roofline.py on kestrel-nano's shape: the byte count and every part run, so the
script a GPU lease depends on is known to work before the lease starts."""

from pathlib import Path

import pytest

from bench.decode_roofline import main
from model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 17 s cold: a benchmark's smoke test
def test_every_part_runs_and_the_roofline_counts_weights_and_kv():
    result = main(["--shape", str(ROOT / "checkpoints" / "kestrel-nano"), "--dtype", "float32",
                   "--tokens", "4", "--batch", "2", "--runs", "1"])
    cfg = ModelConfig.from_json((ROOT / "checkpoints" / "kestrel-nano" / "config.json").read_text())
    assert result["weight_bytes"] == cfg.num_params * 4
    assert result["step_bytes_batch1"] == result["weight_bytes"] + result["kv_bytes_per_step_batch1"]
    assert result["roofline_tokens_per_s_measured_bw"] == pytest.approx(
        result["measured_copy_bandwidth_bytes_per_s"] / result["step_bytes_batch1"])
    # The model loop's rate is a difference of two short runs: on a busy CPU it may be untimed.
    loop = result["model_loop_batch1"]
    assert loop["tokens_per_s"] is None or loop["fraction_of_roofline_measured_bw"] > 0
    assert result["engine_batch1"]["fraction_of_roofline_measured_bw"] > 0
    assert result["engine_batch1"]["all_full_length"] and result["engine_batch2"]["all_full_length"]
    assert result["engine_batch2"]["output_tokens"] == 2 * 4
