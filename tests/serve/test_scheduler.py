"""Scheduler tests against a fake model that reads its history back out of the paged KV store.

The fake runner writes each scheduled token into the page slot its page table names, then reads
the whole history back through the page tables and samples ``next = crc32(history) % V``. A wrong
page table, a page freed while in use, a shared page overwritten or a sliding page released too
early changes the history it reads, hence the tokens, so comparing with a run of each request
alone (straight from its token list) checks the paging end to end.
"""

from __future__ import annotations

import random
import zlib

import pytest

from serve.kv_pages import NULL_PAGE, KVCacheManager, PageGroup, PagePool
from serve.request import FinishReason, Request, RequestStatus, SamplingParams
from serve.scheduler import Scheduler

V = 1000


def next_token(history) -> int:
    return zlib.crc32(repr(tuple(history)).encode()) % V


def reference(prompt, params: SamplingParams) -> list[int]:
    """The request's tokens when run alone, without any cache."""
    history, out = list(prompt), []
    while len(out) < params.max_tokens:
        t = next_token(history)
        out.append(t)
        history.append(t)
        if t in params.stop_token_ids:
            break
    return out


class FakeRunner:
    """Stores (position, token) per page slot, per page group, and samples from what it reads."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.store = [dict() for _ in kv.groups]

    def execute(self, out) -> dict[str, int]:
        G = self.kv.page_size
        sampled = {}
        for e in out.scheduled:
            end = e.start_position + len(e.token_ids)
            for g, (group, table) in enumerate(zip(self.kv.groups, e.page_tables)):
                assert len(table) == -(-end // G)
                for pos, tok in zip(range(e.start_position, end), e.token_ids):
                    page = table[pos // G]
                    # Only a page this request owns alone, and that is not a shared cached page,
                    # may be written.
                    assert page != NULL_PAGE and group.pool.ref_count(page) == 1 and group.pool.key(page) is None
                    self.store[g].setdefault(page, [None] * G)[pos % G] = (pos, tok)
            history = self._read(0, e.page_tables[0], 0, end)
            for g, group in enumerate(self.kv.groups):
                if group.window is not None:  # the first query of the chunk must see its whole window
                    lo = max(0, e.start_position - group.window + 1)
                    assert self._read(g, e.page_tables[g], lo, end) == history[lo:]
            if e.samples:
                sampled[e.request_id] = next_token(history)
        return sampled

    def _read(self, g, table, lo, hi):
        G = self.kv.page_size
        out = []
        for pos in range(lo, hi):
            page = table[pos // G]
            assert page != NULL_PAGE, f"position {pos} is on a released page"
            p, tok = self.store[g][page][pos % G]
            assert p == pos, f"page {page} slot {pos % G} holds position {p}, not {pos}"
            out.append(tok)
        return out


def run(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        running_before = {r.request_id for r in sched.running}
        out = sched.schedule()
        assert out.num_scheduled_tokens == sum(len(e.token_ids) for e in out.scheduled)
        assert out.num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        if out.preempted_request_ids:  # pages are short: no admissions in the same step
            assert {e.request_id for e in out.scheduled} <= running_before
        sched.update(out, runner.execute(out))
    raise AssertionError("scheduler did not drain")


def assert_all_pages_returned(kv: KVCacheManager):
    for g in kv.groups:
        assert g.pool.num_free == g.pool.num_pages
        assert all(g.pool.ref_count(p) == 0 for p in range(g.pool.num_pages))


def make_kv(kind: str, num_pages: int, page_size: int = 4, **kw) -> KVCacheManager:
    if kind == "global":
        return KVCacheManager(PagePool(num_pages, page_size), **kw)
    # A model with global and sliding layers; the sliding pool is much smaller.
    groups = [PageGroup(PagePool(num_pages, page_size)), PageGroup(PagePool(num_pages // 2, page_size), window=7)]
    return KVCacheManager(groups, **kw)


def random_requests(n, seed, *, min_len=1, max_len=40, stop=()):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(V) for _ in range(rng.randint(min_len, max_len))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), stop_token_ids=stop)
        reqs.append(Request(f"r{i}", prompt, params))
    return reqs


@pytest.mark.parametrize("kind", ["global", "global+sliding"])
@pytest.mark.parametrize("num_pages,expect_preemption", [(512, False), (40, True)])
def test_concurrent_requests_equal_each_alone(kind, num_pages, expect_preemption):
    kv = make_kv(kind, num_pages)
    sched = Scheduler(kv, max_num_seqs=32, max_num_batched_tokens=64, prefill_chunk_size=16)
    runner = FakeRunner(kv)
    reqs = random_requests(32, seed=1, stop=tuple(range(0, V, 37)))
    for r in reqs:
        sched.add(r)
    run(sched, runner)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params), r.request_id
        assert r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert (sched.num_preemptions > 0) == expect_preemption
    if expect_preemption:
        assert sum(r.num_preemptions for r in reqs) == sched.num_preemptions
        # Some request was preempted after sampling, so its recompute covered its outputs too.
        assert any(r.num_preemptions and r.total_computed_tokens > r.num_tokens - 1 for r in reqs)
    assert_all_pages_returned(kv)


def test_preemption_without_prefix_cache_recomputes_everything():
    kv = make_kv("global", 40, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=32, max_num_batched_tokens=64, prefill_chunk_size=16)
    reqs = random_requests(32, seed=2)
    for r in reqs:
        sched.add(r)
    run(sched, FakeRunner(kv))
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params)
    assert kv.stats.hits == 0 and kv.pool.num_cached == 0
    assert_all_pages_returned(kv)


def test_second_request_with_same_three_page_prefix_computes_only_new_tokens():
    G = 4
    kv = make_kv("global", 64, G)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(kv)
    prefix = list(range(100, 100 + 3 * G))
    a = Request("a", prefix + [1, 2], SamplingParams(max_tokens=3))
    sched.add(a)
    run(sched, runner)
    b = Request("b", prefix + [7, 8, 9], SamplingParams(max_tokens=3))
    sched.add(b)
    first = sched.schedule()
    assert first.scheduled[0].start_position == 3 * G
    assert first.scheduled[0].token_ids == (7, 8, 9)
    assert first.scheduled[0].page_table[:3] == tuple(kv.pool.lookup(h) for h in b.page_hashes[:3])
    sched.update(first, runner.execute(first))
    run(sched, runner)
    assert b.num_cached_tokens == 3 * G
    assert b.total_computed_tokens == 3 + b.num_output_tokens - 1
    assert b.output_token_ids == reference(b.prompt_token_ids, b.params)
    assert_all_pages_returned(kv)


def test_identical_prompt_of_whole_pages_recomputes_only_its_last_page():
    G = 4
    kv = make_kv("global", 64, G)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(kv)
    prompt = list(range(50, 50 + 3 * G))
    first = Request("a", prompt, SamplingParams(max_tokens=1))
    sched.add(first)
    run(sched, runner)
    again = Request("b", prompt, SamplingParams(max_tokens=2))
    sched.add(again)
    out = sched.schedule()
    # The last prompt token must be computed again to sample from it: 2 of 3 pages are hits.
    assert out.scheduled[0].start_position == 2 * G and out.scheduled[0].samples
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert again.num_cached_tokens == 2 * G
    assert again.output_token_ids == reference(prompt, again.params)


def test_second_conversation_turn_prefills_only_new_tokens():
    G = 4
    kv = make_kv("global", 64, G)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(kv)
    turn1 = Request("t1", list(range(1, 19)), SamplingParams(max_tokens=9))
    sched.add(turn1)
    run(sched, runner)
    history = list(turn1.all_token_ids)  # 27 tokens, 26 computed: 6 full pages cached
    turn2 = Request("t2", history + [5, 6, 7, 8, 9], SamplingParams(max_tokens=4))
    sched.add(turn2)
    run(sched, runner)
    assert turn2.num_cached_tokens == (len(history) - 1) // G * G == 24
    assert turn2.total_computed_tokens == turn2.num_prompt_tokens - 24 + turn2.num_output_tokens - 1
    assert turn2.output_token_ids == reference(turn2.prompt_token_ids, turn2.params)


@pytest.mark.parametrize("defer", [True, False])
def test_batch_sharing_a_system_prompt_computes_it_once(defer):
    G, rng = 4, random.Random(3)
    system = [rng.randrange(V) for _ in range(10 * G)]
    kv = make_kv("global", 400, G)
    sched = Scheduler(kv, max_num_seqs=128, max_num_batched_tokens=512, prefill_chunk_size=16,
                      defer_shared_prefixes=defer)
    reqs = [Request(f"q{i}", system + [rng.randrange(V) for _ in range(rng.randint(1, 9))], SamplingParams(max_tokens=2))
            for i in range(100)]
    for r in reqs:
        sched.add(r)
    run(sched, FakeRunner(kv))
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params)
    computed_alone = sum(r.num_tokens - 1 for r in reqs)
    if defer:
        assert [r.num_cached_tokens for r in reqs].count(0) == 1
        assert all(r.num_cached_tokens == len(system) for r in reqs[1:])
        assert sched.num_computed_tokens == computed_alone - 99 * len(system)
    else:  # the first step admits as many as its budget allows, and each computes the prompt
        assert sched.num_computed_tokens >= computed_alone - 89 * len(system)


def test_cancelling_100_requests_mid_run_returns_every_page():
    kv = make_kv("global+sliding", 300)
    sched = Scheduler(kv, max_num_seqs=64, max_num_batched_tokens=128, prefill_chunk_size=16)
    runner = FakeRunner(kv)
    reqs = random_requests(100, seed=4, min_len=5)
    for r in reqs:
        r.params = SamplingParams(max_tokens=50)  # none finishes in the steps below
        sched.add(r)
    for _ in range(6):
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    statuses = {r.status for r in reqs}
    assert RequestStatus.RUNNING in statuses and RequestStatus.WAITING in statuses
    assert all(g.pool.num_used > 0 for g in kv.groups)
    stats = sched.stats()
    assert stats.pages_in_use == tuple(g.pool.num_used for g in kv.groups)
    assert stats.num_running + stats.num_waiting == 100 and stats.num_running == len(sched.running)
    assert stats.num_computed_tokens == sum(r.total_computed_tokens for r in reqs) > 0
    for r in reqs:
        assert sched.cancel(r.request_id) is r
    assert all(r.finish_reason == FinishReason.CANCELLED and r.is_finished for r in reqs)
    assert_all_pages_returned(kv)
    assert sched.stats().pages_in_use == (0, 0) and sched.stats().num_running == 0
    assert not sched.has_unfinished() and sched.cancel("r0") is None
    out = sched.schedule()
    assert out.is_empty and set(out.finished_request_ids) == {r.request_id for r in reqs}
    sched.update(out, {})


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_deadlines_finish_waiting_and_running_requests():
    clock = Clock()
    kv = make_kv("global", 64)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64, clock=clock)
    runner = FakeRunner(kv)
    running = Request("run", [1, 2, 3], SamplingParams(max_tokens=100), deadline=5.0)
    waiting = Request("wait", [4, 5, 6], SamplingParams(max_tokens=100), deadline=2.5)
    sched.add(running)
    sched.add(waiting)
    for _ in range(2):
        clock.t += 1.0
        out = sched.schedule()
        assert [e.request_id for e in out.scheduled] == ["run"]  # max_num_seqs=1 keeps "wait" queued
        sched.update(out, runner.execute(out))
    clock.t = 2.5
    out = sched.schedule()
    assert out.expired == (waiting,) and waiting.finish_reason == FinishReason.DEADLINE
    assert waiting.num_computed_tokens == 0
    clock.t = 5.0  # passes while the step runs: the sampled token is delivered, then it finishes
    results = sched.update(out, runner.execute(out))
    assert len(results) == 1 and results[0].finished and running.finish_reason == FinishReason.DEADLINE
    assert running.output_token_ids == reference(running.prompt_token_ids, running.params)[:3]
    assert_all_pages_returned(kv)
    # A running request whose deadline passes between steps is finished by schedule().
    late = Request("late", [1, 2, 3, 4, 5], SamplingParams(max_tokens=100), deadline=7.0)
    sched.add(late)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    assert late.status == RequestStatus.RUNNING and kv.pool.num_used == 2
    clock.t = 7.0
    out = sched.schedule()
    assert out.is_empty and out.expired == (late,) and "late" in out.finished_request_ids
    assert late.finish_reason == FinishReason.DEADLINE and late.num_output_tokens == 1
    sched.update(out, {})
    assert_all_pages_returned(kv)


def test_stop_token_and_max_tokens():
    kv = make_kv("global", 64)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = [9, 8, 7]
    ref = reference(prompt, SamplingParams(max_tokens=10))
    stopper = Request("s", prompt, SamplingParams(max_tokens=10, stop_token_ids=(ref[2],)))
    limited = Request("l", prompt, SamplingParams(max_tokens=4))
    sched.add(stopper)
    sched.add(limited)
    run(sched, FakeRunner(kv))
    assert stopper.output_token_ids == ref[:3] and stopper.finish_reason == FinishReason.STOP
    assert limited.output_token_ids == ref[:4] and limited.finish_reason == FinishReason.LENGTH


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end():
    kv = make_kv("global", 128)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=24, prefill_chunk_size=10)
    runner = FakeRunner(kv)
    long = Request("long", list(range(45)), SamplingParams(max_tokens=2))
    short = Request("short", [1, 2], SamplingParams(max_tokens=5))
    sched.add(long)
    sched.add(short)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        for e in out.scheduled:
            assert len(e.token_ids) <= 10
            if e.request_id == "long":
                chunks.append((e.start_position, len(e.token_ids), e.samples))
        # decodes of "short" run alongside the long prefill
        assert out.num_scheduled_tokens <= 24
        sched.update(out, runner.execute(out))
    assert chunks[:5] == [(0, 10, False), (10, 10, False), (20, 10, False), (30, 10, False), (40, 5, True)]
    assert chunks[5] == (45, 1, True)
    assert long.output_token_ids == reference(long.prompt_token_ids, long.params)


def test_max_num_seqs_bounds_running_requests():
    kv = make_kv("global", 256)
    sched = Scheduler(kv, max_num_seqs=3, max_num_batched_tokens=256)
    runner = FakeRunner(kv)
    for r in random_requests(10, seed=5):
        sched.add(r)
    seen = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert sched.num_running <= 3 and len(out.scheduled) <= 3
        seen = max(seen, len(out.scheduled))
        sched.update(out, runner.execute(out))
    assert seen == 3


def test_admission_is_first_come_first_served():
    G = 4
    kv = make_kv("global", 9, G)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    runner = FakeRunner(kv)
    first = Request("first", list(range(20)), SamplingParams(max_tokens=8))  # 5 .. 7 pages
    big = Request("big", list(range(100, 120)), SamplingParams(max_tokens=1))  # 5 pages
    small = Request("small", [1, 2], SamplingParams(max_tokens=1))  # 1 page
    for r in (first, big, small):
        sched.add(r)
    out = sched.schedule()
    # "big" does not fit beside "first"; "small" would, but must not overtake "big".
    assert [e.request_id for e in out.scheduled] == ["first"]
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert big.first_scheduled_time <= small.first_scheduled_time
    assert all(r.output_token_ids == reference(r.prompt_token_ids, r.params) for r in (first, big, small))


def test_bad_input_raises_clear_errors():
    kv = make_kv("global", 8, 4)  # 32 token slots
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs 9 KV pages .* only 8"):
        sched.add(Request("big", list(range(33)), SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="max_tokens=8 needs 10 KV pages"):
        sched.add(Request("long-out", list(range(30)), SamplingParams(max_tokens=8)))
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    sched.add(Request("ok", [1, 2], SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="already queued"):
        sched.add(Request("ok", [3], SamplingParams(max_tokens=2)))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="without update"):
        sched.schedule()
    with pytest.raises(ValueError, match="no sampled token for request 'ok'"):
        sched.update(out, {})
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=0)


def test_sliding_pool_must_hold_one_step():
    groups = [PageGroup(PagePool(64, 4)), PageGroup(PagePool(3, 4), window=8)]
    sched = Scheduler(KVCacheManager(groups), max_num_seqs=4, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match=r"\(group 1\) but the pool has only 3"):
        sched.add(Request("r", list(range(40)), SamplingParams(max_tokens=1)))


def test_aborted_request_mid_step_is_skipped_by_update():
    kv = make_kv("global", 64)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(kv)
    a, b = Request("a", [1, 2, 3], SamplingParams(max_tokens=3)), Request("b", [4, 5], SamplingParams(max_tokens=3))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sampled = runner.execute(out)
    assert sched.abort("a", FinishReason.ERROR) is a
    results = sched.update(out, sampled)
    assert [r.request.request_id for r in results] == ["b"]
    assert a.finish_reason == FinishReason.ERROR and a.output_token_ids == [] and kv.num_held_pages(a) == (0,)
    run(sched, runner)
    assert_all_pages_returned(kv)


def test_soak_1000_random_requests_leaks_no_page():
    rng = random.Random(1234)
    clock = Clock()
    kv = make_kv("global+sliding", 96)
    sched = Scheduler(kv, max_num_seqs=24, max_num_batched_tokens=96, prefill_chunk_size=24, clock=clock)
    runner = FakeRunner(kv)
    systems = [[rng.randrange(V) for _ in range(rng.randint(4, 30))] for _ in range(5)]
    added, finished = 0, []
    while added < 1000 or sched.has_unfinished():
        for _ in range(rng.randint(0, 4) if added < 1000 else 0):
            prompt = (rng.choice(systems) if rng.random() < 0.6 else []) + [rng.randrange(V) for _ in range(rng.randint(1, 20))]
            deadline = clock.t + rng.uniform(0.5, 20) if rng.random() < 0.1 else None
            r = Request(f"r{added}", prompt, SamplingParams(max_tokens=rng.randint(1, 16), stop_token_ids=(3, 5)),
                        deadline=deadline)
            sched.add(r)
            finished.append(r)
            added += 1
        if rng.random() < 0.05 and sched.has_unfinished():
            live = [r for r in finished if not r.is_finished]
            sched.cancel(rng.choice(live).request_id)
        clock.t += 0.1
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        # Every reference is held by a live request's page table.
        for g, group in enumerate(kv.groups):
            held = sum(kv.num_held_pages(r)[g] for r in finished if not r.is_finished)
            assert sum(group.pool.ref_count(p) for p in range(group.pool.num_pages)) == held
    assert_all_pages_returned(kv)
    reasons = {r.finish_reason for r in finished}
    assert {FinishReason.STOP, FinishReason.LENGTH, FinishReason.CANCELLED, FinishReason.DEADLINE} <= reasons
    assert sched.num_preemptions > 0 and kv.stats.hits > 0
    for r in finished:
        if r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            assert r.output_token_ids == reference(r.prompt_token_ids, r.params)
