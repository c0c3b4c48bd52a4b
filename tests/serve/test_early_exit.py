"""Early-exit decoding: threshold 1 changes nothing, threshold 0 exits every decode at the first
exit layer (the output is then the truncated model's), the skipped layers' K/V are the projections
of the exit layer's state (CALM), and bad settings are refused at construction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.generate import GenerationConfig, Generator
from model.rope import rope_tables
from model.transformer import init_model, rope_frequencies
from serve.engine import Engine, EngineRequest
from serve.kv_pages import KVCacheManager
from serve.request import Request, SamplingParams
from serve.runner import ModelRunner
from serve.scheduler import Scheduler
from test_runner import random_prompts, tiny_model

VOCAB = 360
PAGE = 4
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64, max_position_embeddings=1024,
                  layer_types=("sliding", "global", "global"), sliding_window=8, exit_layers=(1, 2))
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = random_prompts(4, seed=3)  # one workload for every test: the compilations are shared


def sharp(model):
    """Weights x10, so greedy continuations depend on the prompt (as in test_runner.tiny_model)."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params))
    return model


@functools.lru_cache(maxsize=None)
def exit_model():
    return sharp(init_model(CFG, 0))


def truncated(model, layers: int):
    """The model's first ``layers`` blocks with its own final norm and head: what an exit computes."""
    cfg = model.config
    small = init_model(cfg.replace(num_layers=layers, layer_types=cfg.layer_types[:layers], exit_layers=()))
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["blocks"] = {i: b for i, b in pure["blocks"].items() if int(i) < layers}
    state = nnx.state(small)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(small, state)
    return small


def drive(model, prompts, threshold, pages_of=None):
    """Scheduler + runner to completion; returns (outputs, exit counts, runner, last page tables)."""
    cfg = model.config
    kv = KVCacheManager.for_layers(cfg.layer_types, cfg.sliding_window, num_pages=256, page_size=PAGE)
    sched = Scheduler(kv, 32, 64, 16)
    runner = ModelRunner(model, kv, early_exit_threshold=threshold)
    reqs = [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    tables = {}
    while sched.has_unfinished():
        out = sched.schedule()
        tables.update({e.request_id: e.page_tables for e in out.scheduled})
        sampled = runner.execute(out)
        sched.update(out, {k: s.token_id for k, s in sampled.items()})
    return [r.output_token_ids for r in reqs], runner.exit_counts, runner, tables


def test_threshold_one_never_exits_and_equals_the_engine_without_early_exit():
    model = exit_model()
    prompts = PROMPTS
    outputs = {}
    for threshold in (None, 1.0):
        engine = Engine(model, None, num_pages=256, page_size=PAGE, max_num_seqs=32,
                        max_num_batched_tokens=64, prefill_chunk_size=16, early_exit_threshold=threshold)
        hs = [engine.submit(EngineRequest(prompt_token_ids=p, channels=False, params=GREEDY)) for p in prompts]
        engine.run_until_idle()
        outputs[threshold] = [h.output_token_ids for h in hs]
        counts = engine.runner.exit_counts
        assert (counts == {}) if threshold is None else (set(counts) == {0} and counts[0] > 4)
    assert outputs[1.0] == outputs[None]
    assert len({tuple(o) for o in outputs[None]}) > 2


def test_threshold_zero_exits_every_decode_at_the_first_exit_and_equals_the_truncated_model():
    model = exit_model()
    prompts = PROMPTS
    outs, counts, _, _ = drive(model, prompts, 0.0)
    full, _, _, _ = drive(model, prompts, None)
    assert set(counts) == {1} and counts[1] >= GREEDY.max_tokens - 1
    assert outs != full  # the exit really changes the tokens (an untrained exit head)
    # The first token comes from the (full) prefill; every later one from the first block alone,
    # whose K/V the exit leaves exactly as a one-block model computes them.
    assert [o[0] for o in outs] == [f[0] for f in full]
    small = truncated(model, 1)
    expected = Generator(small).generate([p + o[:1] for p, o in zip(prompts, outs)],
                                         GenerationConfig(max_new_tokens=GREEDY.max_tokens - 1))
    assert [o[1:] for o in outs] == [g.token_ids for g in expected]


def test_skipped_layers_keys_and_values_are_projections_of_the_exit_state():
    model = exit_model()
    prompt = PROMPTS[0]
    outs, counts, runner, tables = drive(model, PROMPTS, 0.0)
    assert set(counts) == {1}
    tokens = prompt + outs[0][:-1]  # every token whose K/V were written
    t = len(tokens)
    x = model.embed(jnp.asarray([tokens]))
    ropes = {kind: rope_tables(jnp.arange(t)[None], *f) for kind, f in rope_frequencies(CFG).items()}
    x, _ = model.blocks[0](x, rope=ropes["sliding"], q_positions=None, kv_positions=None)
    decoded = np.arange(len(prompt), t)  # positions computed by exited decode steps
    for layer in (1, 2):  # the layers an exit after block 1 skips
        block = model.blocks[layer]
        _, k, v = block.attn.project(block.attn_norm(x), ropes[block.layer_type])
        group = runner.layer_groups[layer]
        table = np.asarray(tables["r0"][group])
        pages = table[decoded // PAGE]
        got_k = np.asarray(runner.k[layer])[:, pages, decoded % PAGE]  # [K, n, H]
        got_v = np.asarray(runner.v[layer])[:, pages, decoded % PAGE]
        np.testing.assert_allclose(got_k.transpose(1, 0, 2), np.asarray(k[0, decoded]), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got_v.transpose(1, 0, 2), np.asarray(v[0, decoded]), rtol=1e-4, atol=1e-3)
        assert np.abs(got_k).max() > 0.1


def test_bad_early_exit_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="no exit_layers"):
        Engine(tiny_model(), None, num_pages=64, page_size=PAGE, early_exit_threshold=0.9)
    with pytest.raises(ValueError, match=r"early_exit_threshold must be in \[0, 1\]"):
        Engine(exit_model(), None, num_pages=64, page_size=PAGE, early_exit_threshold=1.5)
    for exits in ((3,), (2, 1), (0,), (1, 1)):
        with pytest.raises(ValueError, match="exit_layers"):
            CFG.replace(exit_layers=exits)
    assert ModelConfig.from_json(CFG.to_json()) == CFG
