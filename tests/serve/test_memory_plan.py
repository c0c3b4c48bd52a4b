"""The memory planner: page arithmetic shared with the engine, flat sliding layers, verdicts."""

import json
import math

import pytest

from kestrel.cli import main
from model.config import ModelConfig
from serve.kv_pages import KVCacheManager
from serve.memory_plan import GiB, describe, max_batch, max_context, plan_memory, verdict

# Gemma 3's pattern, 5 sliding : 1 global, at a tiny width.
CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1, head_dim=32,
                  intermediate_size=128, layer_types=("sliding",) * 5 + ("global",), sliding_window=512,
                  max_position_embeddings=262_144)


def test_kv_bytes_and_pages_follow_the_engine_page_arithmetic():
    plan = plan_memory(CFG, context=200_000, batch=3, page_size=16, prefill_chunk=256, budget=None)
    kv = KVCacheManager.for_layers(CFG.layer_types, CFG.sliding_window, num_pages=1, page_size=16)
    need = kv.required_pages(200_000 - 1, 256)
    glob, slid = plan.groups
    assert (glob.kind, glob.num_layers, slid.kind, slid.num_layers) == ("global", 1, "sliding", 5)
    assert (glob.pages_per_sequence, slid.pages_per_sequence) == need
    assert glob.pages_per_sequence == math.ceil(199_999 / 16)
    assert slid.pages_per_sequence == math.ceil((512 - 1 + 256) / 16) + 1
    per_token = 2 * 1 * 32 * 4  # K and V, K heads x H, float32
    assert glob.bytes == 3 * glob.pages_per_sequence * 16 * per_token * 1
    assert slid.bytes == 3 * slid.pages_per_sequence * 16 * per_token * 5
    assert plan.weights == CFG.num_params * 4
    assert plan.total == plan.weights + plan.kv_cache + plan.working_set
    half = plan_memory(CFG, context=200_000, batch=3, page_size=16, prefill_chunk=256,
                       kv_cache_dtype="bfloat16")
    assert half.kv_cache * 2 == plan.kv_cache


def test_a_pointer_adds_its_keys_and_token_ids_in_the_first_groups_pages():
    kw = dict(context=200_000, batch=3, page_size=16, prefill_chunk=256, budget=None)
    plan = plan_memory(CFG.replace(pointer_dim=16), **kw)
    glob, _, pointer = plan.groups
    assert (pointer.kind, pointer.num_pages, pointer.window) == ("pointer", glob.num_pages, None)
    assert pointer.bytes == glob.num_pages * 16 * (16 * 4 + 4)  # float32 keys, int32 token ids
    assert plan.kv_cache == plan_memory(CFG, **kw).kv_cache + pointer.bytes
    assert "KV cache, pointer" in describe(plan, CFG.replace(pointer_dim=16))


def test_sliding_layers_memory_stays_flat_while_global_grows():
    plans = [plan_memory(CFG, context=c, batch=1, prefill_chunk=256) for c in (10_000, 50_000, 200_000)]
    sliding = [p.groups[1].bytes for p in plans]
    glob = [p.groups[0].bytes for p in plans]
    assert sliding[0] == sliding[1] == sliding[2]
    assert glob[0] < glob[1] < glob[2]
    assert glob[2] / glob[0] == pytest.approx(20, rel=0.01)


def test_scores_count_only_where_attention_materialises_them():
    on_cpu = plan_memory(CFG, context=200_000, prefill_chunk=256, materialized_scores=True)
    fused = plan_memory(CFG, context=200_000, prefill_chunk=256, materialized_scores=False)
    key = "attention scores [B, N, T, S] x2 + mask"
    # One 256-token chunk against the global layer's 200K keys (table bucket 16,384 pages).
    assert on_cpu.prefill[key] == 256 * 16_384 * 16 * (2 * 2 * 4 + 1)
    assert fused.prefill[key] == 0
    assert fused.working_set < on_cpu.working_set


def test_verdict_states_shortfall_and_what_fits():
    kw = dict(context=200_000, batch=8, max_output=100_000, prefill_chunk=256, budget=2 * GiB,
              budget_source="test")
    plan = plan_memory(CFG, **kw)
    assert not plan.fits and plan.shortfall == plan.total - int(2 * GiB * 0.9)
    b, c = max_batch(kw, CFG), max_context(kw, CFG, limit=200_000)
    assert 1 <= b < 8 and 1 <= c < 200_000
    assert plan_memory(CFG, **{**kw, "batch": b}).fits
    assert not plan_memory(CFG, **{**kw, "batch": b + 1}).fits
    assert plan_memory(CFG, **{**kw, "context": c, "max_output": c // 2}).fits
    assert not plan_memory(CFG, **{**kw, "context": c + 1, "max_output": (c + 1) // 2}).fits
    text = verdict(plan, CFG, kw)
    assert text.startswith("does not fit") and f"at most {b} sequence(s)" in text
    assert f"at most {c:,} tokens" in text


@pytest.mark.parametrize("kw, problem", [
    (dict(context=0), "context must be an int >= 1"),
    (dict(context=100, max_output=101), "cannot exceed the context"),
    (dict(context=100, kv_cache_dtype="int4"), "kv_cache_dtype must be one of"),
    (dict(context=100, batch=0), "batch must be an int >= 1"),
    (dict(context=100, utilization=1.5), "utilization must be in"),
])
def test_bad_arguments_are_named(kw, problem):
    with pytest.raises(ValueError, match=problem):
        plan_memory(CFG, **kw)


def test_kestrel_plan_cli(tmp_path, capsys):
    config = tmp_path / "long.py"
    config.write_text("from model.config import ModelConfig\n"
                      "from train.config import RunConfig\n"
                      f"def config():\n    return RunConfig(name='long', model=ModelConfig.from_json({CFG.to_json()!r}))\n")
    args = ["plan", str(config), "--context", "200000", "--batch", "2", "--prefill-chunk", "256"]
    assert main(args + ["--memory", "64"]) == 0
    out = capsys.readouterr().out
    assert "KV cache, sliding layers" in out and "fits:" in out
    assert main(args + ["--memory", "0.25", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["shortfall"] > 0
    assert "does not fit" in report["verdict"] and "at batch 2 the context can be at most" in report["verdict"]
    assert main(["plan", str(config), "--context", "300000"]) == 2
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err


def test_kestrel_serve_refuses_at_start_with_the_numbers():
    import argparse

    from kestrel.errors import KestrelError
    from serve.chat_cli import add_serve_arguments, build_server

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    nano = "checkpoints/kestrel-nano"  # 2,048-token context, 4 global layers
    with pytest.raises(KestrelError) as e:  # the planner, before any weight is loaded
        build_server(parser.parse_args([nano, "--memory", "0.1"]))
    msg = str(e.value)
    assert "max-model-len 2,048 x max-num-seqs 32 does not fit the memory" in msg
    assert "KV cache, global layers" in msg and "at context 2,048 at most 2 sequence(s) fit" in msg
    with pytest.raises(KestrelError, match="exceeds the model's max_position_embeddings"):
        build_server(parser.parse_args([nano, "--max-model-len", "4096"]))
    with pytest.raises(KestrelError, match=r"needs 128 pages of 16 tokens in the global group \(4 layer\(s\)\), "
                                           r"but its pool has 64 pages"):
        build_server(parser.parse_args([nano, "--num-pages", "64"]))
    server = build_server(parser.parse_args([nano, "--max-model-len", "1024", "--max-num-seqs", "4",
                                             "--memory", "8"]))
    assert [g.pool.num_pages for g in server.engine.kv.groups] == [4 * 64]  # 4 sequences of 1,023 stored tokens
    assert server.model.context_length == 1024
