"""The pieces of speculative decoding on their own: prompt lookup, greedy verification, the
rejection sampler's output distribution (a seeded statistical test), the scheduler's lookahead
slots and their rollback, the acceptance monitor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.kv_pages import KVCacheManager, PagePool
from serve.rejection import verify_drafts as _verify_drafts
from serve.request import Request, SamplingParams
from serve.scheduler import Scheduler
from serve.speculative import AcceptanceMonitor, SpeculativeConfig, ngram_draft


verify_drafts = jax.jit(_verify_drafts, static_argnames=("sampling", "masked"))


def test_prompt_lookup_takes_the_longest_then_latest_match():
    seq = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 3, 5, 6, 8, 1, 2, 3]
    # "1 2 3" occurs at 0 and 8: the latest one is continued.
    assert ngram_draft(seq, 3, 1, 3) == [5, 6, 8]
    assert ngram_draft(seq, 10, 3, 3) == [5, 6, 8, 1, 2, 3]  # up to the end of the sequence
    assert ngram_draft([5, 6, 7, 8], 3, 1, 3) == []  # nothing repeats
    assert ngram_draft([4, 4], 3, 1, 3) == [4]  # n = 1: the one earlier 4 is followed by 4


def _params(b, temperature, **kw):
    p = dict(temperature=jnp.full((b,), temperature, jnp.float32), top_k=jnp.zeros((b,), jnp.int32),
             top_p=jnp.ones((b,), jnp.float32), min_p=jnp.zeros((b,), jnp.float32),
             seed=jnp.arange(b, dtype=jnp.uint32), out_index=jnp.zeros((b,), jnp.int32))
    p.update({k: jnp.asarray(v) for k, v in kw.items()})
    return p


def test_greedy_verification_accepts_while_the_draft_is_the_argmax():
    logits = jnp.asarray(np.eye(6, dtype=np.float32)[[[1, 2, 3, 4]] * 3])  # argmax 1, 2, 3, 4
    drafts = jnp.asarray([[1, 2, 3], [1, 5, 3], [1, 2, 3]], jnp.int32)
    tokens, n = verify_drafts(logits, drafts, jnp.asarray([3, 3, 1], jnp.int32), _params(3, 0.0),
                              sampling=False, masked=False)
    assert n.tolist() == [3, 1, 1]  # all + bonus; stops at the mismatch; stops at num_drafts
    assert tokens[0].tolist() == [1, 2, 3, 4] and tokens[1, :2].tolist() == [1, 2]
    assert tokens[2, :2].tolist() == [1, 2]
    # A mask moves the argmax: a draft equal to the unmasked argmax is rejected.
    mask = jnp.full((3, 1), ~(1 << 2), jnp.int32)  # token 2 banned
    tokens, n = verify_drafts(logits, drafts, jnp.asarray([3, 3, 3], jnp.int32),
                              _params(3, 0.0, mask=mask), sampling=False, masked=True)
    assert n.tolist() == [1, 1, 1] and tokens[0, 1] != 2


@pytest.mark.parametrize("deterministic", [True, False])
def test_rejection_sampling_preserves_the_target_distribution(deterministic):
    """Whatever q proposes, every emitted token is distributed as p (here per position, with p and
    q fixed per position). 40,000 seeded rows; the tolerance is > 8 standard errors, so the test
    is deterministic in practice and still catches a sampler that returns q or an unnormalised
    residual (those are off by >= 0.08 at some token here)."""
    V, T, B = 6, 3, 40_000
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(T, V)).astype(np.float32) * 1.5
    q = rng.dirichlet(np.ones(V), size=T - 1).astype(np.float32)  # [T-1, V]
    keys = jax.random.split(jax.random.key(7), T - 1)
    if deterministic:  # prompt lookup: always the same draft, q one-hot
        drafts = np.tile(np.array([[2, 4]], np.int32), (B, 1))
        draft_probs = None
    else:
        drafts = np.stack([np.asarray(jax.random.categorical(keys[j], jnp.log(q[j]), shape=(B,)))
                           for j in range(T - 1)], axis=1).astype(np.int32)
        draft_probs = jnp.broadcast_to(jnp.asarray(q), (B, T - 1, V))
    logits = jnp.broadcast_to(jnp.asarray(p_logits), (B, T, V))
    tokens, n = verify_drafts(logits, jnp.asarray(drafts), jnp.full((B,), T - 1, jnp.int32),
                              _params(B, 1.0), sampling=True, masked=False, draft_probs=draft_probs)
    tokens, n = np.asarray(tokens), np.asarray(n)
    p = np.asarray(jax.nn.softmax(jnp.asarray(p_logits), axis=-1))
    for j in range(T):
        rows = n >= j  # position j emitted a token
        freq = np.bincount(tokens[rows, j], minlength=V) / rows.sum()
        se = np.sqrt(p[j] * (1 - p[j]) / rows.sum()).max()
        assert np.abs(freq - p[j]).max() < max(8 * se, 0.01), (j, freq, p[j])
    if deterministic:  # acceptance of a fixed draft x is p(x)
        assert abs((n >= 1).mean() - p[0, 2]) < 0.01


def test_top_k_applies_to_verification():
    V, B = 5, 2000
    logits = jnp.broadcast_to(jnp.asarray([[3.0, 2.9, 2.8, 0.0, -1.0]] * 2), (B, 2, V))
    drafts = jnp.full((B, 1), 3, jnp.int32)  # outside the top 2: never accepted
    tokens, n = verify_drafts(logits, drafts, jnp.ones((B,), jnp.int32),
                              _params(B, 1.0, top_k=np.full((B,), 2, np.int32)), sampling=True, masked=False)
    assert int(np.asarray(n).max()) == 0
    assert set(np.asarray(tokens)[:, 0].tolist()) == {0, 1}


def test_lookahead_slots_are_scheduled_then_rolled_back_to_the_committed_tokens():
    kv = KVCacheManager(PagePool(16, 4))
    sched = Scheduler(kv, 4, 64)
    r = Request("a", list(range(1, 7)), SamplingParams(max_tokens=20))
    sched.add(r)
    out = sched.schedule()
    sched.update(out, {"a": 9})  # prefill: 6 prompt tokens computed, one output
    r.num_lookahead_tokens = 5
    out = sched.schedule()
    (e,) = out.scheduled
    assert e.token_ids == (9,) and e.num_lookahead == 5 and out.num_scheduled_tokens == 6
    assert len(kv.page_tables(r)[0]) == 3  # positions 6..11 need pages 1 and 2
    with pytest.raises(ValueError, match="1 to 6 sampled tokens"):
        sched._committed(e, [1] * 7)
    sched.update(out, {"a": [11, 12]})  # one draft accepted plus the target's token
    assert r.output_token_ids == [9, 11, 12] and r.num_computed_tokens == 8
    assert len(kv.page_tables(r)[0]) == 2 and kv.pool.num_used == 2  # page 2 held rejected slots
    assert r.total_computed_tokens == 12
    r.num_lookahead_tokens = 0
    out = sched.schedule()
    assert out.scheduled[0].token_ids == (12,) and out.scheduled[0].num_lookahead == 0


def test_lookahead_is_cut_to_the_step_budget_and_a_stop_token_ends_the_run():
    kv = KVCacheManager(PagePool(16, 4))
    sched = Scheduler(kv, 4, 3)
    r = Request("a", [1, 2], SamplingParams(max_tokens=20, stop_token_ids=(7,)))
    sched.add(r)
    sched.update(sched.schedule(), {"a": 5})
    r.num_lookahead_tokens = 4
    out = sched.schedule()
    assert out.scheduled[0].num_lookahead == 2  # 1 + 2 = the budget of 3
    results = sched.update(out, {"a": [6, 7, 8]})
    assert [x.token_id for x in results] == [6, 7] and results[-1].finished
    assert r.output_token_ids == [5, 6, 7] and kv.pool.num_used == 0


def test_acceptance_monitor_switches_a_request_off_and_pauses_the_server():
    cfg = SpeculativeConfig(min_acceptance_rate=0.5, acceptance_window=4, pause_steps=10)
    mon = AcceptanceMonitor(cfg)
    mon.record("good", 4, 4, step=0)
    mon.record("bad", 4, 1, step=0)
    assert mon.allows("good", 1) and not mon.allows("bad", 1)
    for step in range(8):  # the server's last 32 drafted tokens fall under 50 %
        mon.record("other", 4, 1, step=step)
    assert mon.num_pauses == 1 and not mon.allows("good", 8) and mon.allows("good", 8 + 10)
    mon.forget("bad")
    assert mon.allows("bad", 100)
