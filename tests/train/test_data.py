"""The synthetic pipeline: deterministic, resumable, correctly masked, wired to the loop's factory."""

import dataclasses

import numpy as np
import pytest

from configs.kestrel_nano_tiny import config as tiny_config
from kestrel.errors import KestrelError
from model.tokenizer import Tokenizer
from train.curriculum import Curriculum
from train.data import TOKENIZER_ENV, SyntheticBatches, SyntheticDataConfig, synthetic_batches
from train.nano_tokenizer import corpus
from train.synthetic import render_kestrel

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train_sentencepiece(corpus(200, seed=5), 700, path)
    return str(path)


def config(tok_dir, **kw):
    kw = {"batch_size": 2, "seq_len": 1536, "seed": 3, **kw}
    return SyntheticDataConfig(tokenizer=tok_dir, **kw)


def assert_same(a, b):
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])


def test_batches_have_the_loop_protocol(tok_dir):
    data = SyntheticBatches(config(tok_dir))
    batch = next(data)
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (2, 1536)
        assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    assert batch["loss_mask"].sum() > 100 and (batch["segment_ids"] > 0).mean() > 0.5
    assert data.get_state() == {"next_batch": 1}


def test_resume_gives_the_same_next_batches(tok_dir):
    cfg = config(tok_dir, num_threads=2, prefetch=2)
    run = SyntheticBatches(cfg)
    first = [next(run) for _ in range(3)]
    state = run.get_state()
    rest = [next(run) for _ in range(2)]
    resumed = SyntheticBatches(cfg)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(2)]):
        assert_same(a, b)
    assert_same(first[1], SyntheticBatches(cfg).batch(1))  # batch s is a function of (seed, s)
    assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
    other = SyntheticBatches(dataclasses.replace(cfg, seed=4)).batch(0)
    assert not np.array_equal(other["tokens"], first[0]["tokens"])
    with pytest.raises(ValueError, match="next_batch"):
        run.set_state({"index": 2})


def test_loss_mask_is_the_assistant_text_of_the_placed_examples(tok_dir):
    data = SyntheticBatches(config(tok_dir))
    batch, stats, placed = data.builder.build(7)
    tok = data.builder.tokenizer
    assert stats.examples == len(placed) >= 2
    got = []
    for row in range(2):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            m = batch["loss_mask"][row, idx] > 0
            got.append(tok.decode(batch["targets"][row, idx][m]))
    want = ["".join(t for t, tr in render_kestrel(ex) if tr) for ex in placed]
    assert sorted(got) == sorted(want)
    # No user, system or tool text is ever a target with loss.
    for text in got:
        assert "<|im_start|>" not in text and "<tool_response>" not in text


def test_curriculum_sets_each_batchs_levels(tok_dir):
    cur = Curriculum(((0, (1, 0, 0, 0, 0)), (10, (0, 0, 0, 0, 1))))
    data = SyntheticBatches(config(tok_dir, curriculum=cur, seq_len=2048))
    assert {ex.meta["level"] for ex in data.builder.build(0)[2]} == {1}
    assert {ex.meta["level"] for ex in data.builder.build(10)[2]} == {5}


def test_factory_reads_the_run_config(tok_dir, monkeypatch):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, steps=100, model=cfg.model.replace(vocab_size=700),
                              data=dataclasses.replace(cfg.data, seq_len=1536, batch_size=2))
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    with pytest.raises(KestrelError, match="tokenizer"):
        synthetic_batches(cfg)
    monkeypatch.setenv(TOKENIZER_ENV, tok_dir)
    data = synthetic_batches(cfg)
    assert data.config.curriculum == Curriculum.default(100) and data.config.seq_len == 1536
    assert next(data)["tokens"].shape == (2, 1536)
    small = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=64))
    with pytest.raises(KestrelError, match="vocab_size"):
        synthetic_batches(small)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tok_dir):
    cfg = config(tok_dir, seq_len=1024)
    local = SyntheticBatches(cfg)
    workers = SyntheticBatches(dataclasses.replace(cfg, num_workers=2))
    workers.set_state({"next_batch": 2})
    for s in (2, 3, 4):
        assert_same(local.batch(s), next(workers))



def test_the_loop_builds_and_places_it(tok_dir, monkeypatch):
    # The loop's own factory call and batch placement (no training step: that compiles for minutes).
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from train.loop import make_batches, shard_batch

    monkeypatch.setenv(TOKENIZER_ENV, tok_dir)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=700),
                              data=dataclasses.replace(cfg.data, source="train.data:synthetic_batches",
                                                       batch_size=8, seq_len=1536))
    data = make_batches(cfg)
    assert isinstance(data, SyntheticBatches)
    mesh = jax.make_mesh((8,), ("data",))
    placed = shard_batch(next(data), NamedSharding(mesh, P("data")), 8, 1536)
    assert placed["tokens"].shape == (8, 1536) and len(placed["tokens"].sharding.device_set) == 8
    assert data.get_state() == {"next_batch": 1}


def test_sessions_share_one_header_and_train_every_exchange(tok_dir):
    from train.synthetic import SUITES, render_session

    data = SyntheticBatches(config(tok_dir, session_size=3, seq_len=4096, batch_size=1))
    groups = []
    for group in data.builder.conversations(5):
        groups.append(group)
        if len(groups) == 40:
            break
    again = []
    for group in data.builder.conversations(5):
        again.append(group)
        if len(again) == 40:
            break
    assert groups == again  # deterministic per step
    multi = [g for g in groups if len(g) > 1]
    assert multi and max(len(g) for g in groups) <= 3
    for g in multi:
        assert all(ex.meta["task"] in SUITES["stem"] and ex.tools == g[0].tools for ex in g)
        segs = render_session(g)
        text = "".join(t for t, _ in segs)
        assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>user\n") >= len(g)
        trained = "".join(t for t, tr in segs if tr)
        for ex in g:  # every problem's reasoning, calls and answer are learnt
            final = "".join(t for t, tr in render_kestrel(ex) if tr)
            assert final in trained
    # Nothing of the stream is lost or repeated: the examples are the plain stream, regrouped.
    flat = [ex for g in groups for ex in g]
    stream = data.builder.examples(5)
    plain = [next(stream) for _ in range(len(flat) + 20)]
    assert all(ex in plain for ex in flat) and len({id(e) for e in flat}) == len(flat)
    with pytest.raises(ValueError, match="same tools"):
        render_session([g for g in groups if g[0].tools][0][:1] + [g for g in groups if not g[0].tools][0][:1])


def test_efforts_reach_the_batches_and_a_session_keeps_one(tok_dir):
    mix = (("low", 1.0), ("high", 1.0), (None, 1.0))
    data = SyntheticBatches(config(tok_dir, session_size=3, seq_len=4096, batch_size=1, efforts=mix))
    groups = []
    for group in data.builder.conversations(2):
        groups.append(group)
        if len(groups) == 40:
            break
    efforts = {ex.meta.get("effort") for g in groups for ex in g}
    assert {"low", "high", None} <= efforts
    for g in groups:  # one system turn per session, so one effort
        assert len({ex.meta.get("effort") for ex in g}) == 1
    with pytest.raises(ValueError, match="unknown effort"):
        config(tok_dir, efforts=(("max", 1.0),))
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=700),
                              data=dataclasses.replace(cfg.data, seq_len=1536, batch_size=2, tokenizer=tok_dir,
                                                       efforts=mix))
    assert synthetic_batches(cfg).config.efforts == mix
