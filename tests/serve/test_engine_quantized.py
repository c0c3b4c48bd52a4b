"""The engine with int8 KV pages (--kv-cache-dtype int8) and int8 weights (--quantize int8):
greedy decoding mostly agrees with float, memory is measured from the arrays, pages are freed,
and unsupported types fail before anything is allocated."""

import pytest

from model.quantization import UnsupportedQuantization, quantize_model
from serve.engine import Engine, EngineRequest
from serve.request import SamplingParams
from serve.runner import ModelRunner
from test_runner import VOCAB, random_prompts, tiny_model

PAGE, MAX_TOKENS = 4, 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True, top_logprobs=2)


def greedy_outputs(model, prompts, **kw):
    """Greedy continuations with their samples (token, logprob, top-2), and the engine."""
    engine = Engine(model, None, num_pages=256, page_size=PAGE, max_num_seqs=8,
                    max_num_batched_tokens=64, prefill_chunk_size=16, **kw)
    handles = [engine.submit(EngineRequest(prompt_token_ids=p, params=GREEDY, channels=False))
               for p in prompts]
    engine.run_until_idle()
    return [list(h.logprobs) for h in handles], engine


def assert_mostly_agree(got, want, *, logprob_atol=0.15):
    """Greedy decoding of a random model meets near-ties (top-2 within hundredths of a nat) that
    any numerical change may flip, after which continuations differ. So, stated: at least half
    the continuations are identical; where one differs, the float model's top-2 margin there was
    under 0.1 nats (a near-tie, not a wrong model); and up to that point every sampled token's
    logprob is within ``logprob_atol`` of float's."""
    identical = 0
    for g, w in zip(got, want):
        assert len(g) == len(w) == MAX_TOKENS
        first = next((i for i, (a, b) in enumerate(zip(g, w)) if a.token_id != b.token_id), None)
        identical += first is None
        same = g[:first] if first is not None else g
        diffs = [abs(a.logprob - b.logprob) for a, b in zip(same, w)]
        assert max(diffs, default=0.0) < logprob_atol, diffs
        if first is not None:
            top = w[first].top_logprobs
            assert top[0][1] - top[1][1] < 0.1, (first, top, g[first].top_logprobs)
    assert identical >= len(got) / 2


PROMPTS = random_prompts(6, lo=5, hi=30, seed=3)


@pytest.fixture(scope="module")
def float_outputs():
    return greedy_outputs(tiny_model(), PROMPTS)[0]


def test_int8_kv_cache_greedy_mostly_agrees_with_float(float_outputs):
    got, engine = greedy_outputs(tiny_model(), PROMPTS, kv_cache_dtype="int8")
    assert_mostly_agree(got, float_outputs)
    assert engine.kv.pool.num_used == 0  # every page back after the requests finished


def test_int8_kv_pages_take_under_half_of_bf16():
    model = tiny_model()
    kv = Engine(model, None, num_pages=64, page_size=PAGE).kv
    bf16 = ModelRunner(model, kv, cache_dtype="bfloat16")
    int8 = ModelRunner(model, kv, cache_dtype="int8")
    f32 = ModelRunner(model, kv)
    # head_dim 8 and 4-token pages make the per-page scale (4 bytes per 32 values) weigh 1/8.
    assert int8.kv_bytes <= 0.57 * bf16.kv_bytes and int8.kv_bytes <= 0.29 * f32.kv_bytes
    cfg = model.config
    per_token_bf16 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert bf16.kv_bytes_per_token() == pytest.approx(per_token_bf16)
    assert int8.kv_bytes_per_token() == pytest.approx(
        per_token_bf16 / 2 + 2 * cfg.num_layers * cfg.num_kv_heads * 4 / PAGE)


@pytest.mark.slow  # ~20 s each on the shared CPU; tests/model/test_quantization.py covers the model
@pytest.mark.parametrize("mode", ["int8", "int8-w8a8"])
def test_int8_weights_serve_and_mostly_agree(float_outputs, mode):
    got, _ = greedy_outputs(quantize_model(tiny_model(), mode), PROMPTS)
    assert_mostly_agree(got, float_outputs)


def test_unsupported_kv_cache_dtype_fails_before_allocating():
    with pytest.raises(UnsupportedQuantization, match=r"KV cache dtype 'fp8' is not supported.*int8"):
        Engine(tiny_model(), None, num_pages=8, page_size=PAGE, kv_cache_dtype="fp8")
    assert VOCAB == tiny_model().config.vocab_size


def test_serve_flags_quantize_at_load_and_check_types_first(tmp_path):
    """``kestrel serve --quantize int8 --kv-cache-dtype int8`` on a float checkpoint; bad types
    are reported before the checkpoint is even read (the folder here is not a checkpoint)."""
    import argparse

    from kestrel.errors import KestrelError
    from model.checkpoint import save_checkpoint
    from model.kv_int8 import is_int8_pages
    from serve.chat_cli import add_serve_arguments, build_server

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(KestrelError, match="quantization type 'int4' is not supported"):
        build_server(parser.parse_args([str(tmp_path), "--quantize", "int4"]))
    with pytest.raises(KestrelError, match="KV cache dtype 'fp8' is not supported"):
        build_server(parser.parse_args([str(tmp_path), "--kv-cache-dtype", "fp8"]))
    ckpt = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    server = build_server(parser.parse_args([str(ckpt), "--quantize", "int8", "--kv-cache-dtype", "int8",
                                             "--num-pages", "16", "--max-model-len", "256"]))
    assert server.engine.config.quantization == "int8"
    assert all(is_int8_pages(pages) for pages in server.engine.runner.k + server.engine.runner.v)
