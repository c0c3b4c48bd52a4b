"""Hypothesis state machine over the KV manager: random admissions, steps, frees and evictions.

A shadow store records which (position, token) each page slot holds. Invariants: reference counts
equal the pages live requests hold; a cache hit only ever hands out pages whose contents are
exactly the request's tokens at those positions (for a sliding group, those its window sees);
nothing a request holds is ever written by another.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from serve.kv_pages import NULL_PAGE, KVCacheManager, PageGroup, PagePool
from serve.request import Request

G, W = 3, 5


class KVMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager([PageGroup(PagePool(14, G)), PageGroup(PagePool(8, G), window=W)])
        self.store = [dict(), dict()]
        self.live: dict[str, Request] = {}
        self.n = 0

    def _write(self, request: Request, tables, start: int, stop: int):
        for g, (group, table) in enumerate(zip(self.kv.groups, tables)):
            for pos in range(start, stop):
                page = table[pos // G]
                assert group.pool.ref_count(page) == 1 and group.pool.key(page) is None
                self.store[g].setdefault(page, [None] * G)[pos % G] = (pos, request.token_slice(pos, pos + 1)[0])

    def _check_pages(self, request: Request, tables, first_query: int, upto: int):
        """Positions ``[0, upto)`` as the query at ``first_query`` and later ones see them."""
        tokens = request.token_slice(0, upto)
        for g, (group, table) in enumerate(zip(self.kv.groups, tables)):
            lo = 0 if group.window is None else max(0, first_query - group.window + 1)
            for pos in range(lo, upto):
                page = table[pos // G]
                assert page != NULL_PAGE
                assert self.store[g][page][pos % G] == (pos, tokens[pos])

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14), chunk=st.integers(1, 8))
    def admit(self, tokens, chunk):
        request = Request(f"r{self.n}", tokens)
        self.n += 1
        hit = self.kv.get_computed_pages(request)
        assert hit.num_tokens % G == 0 and hit.num_tokens < request.num_tokens
        n = min(chunk, request.num_tokens - hit.num_tokens)
        tables = self.kv.allocate_slots(request, n, hit)
        if tables is None:
            return
        if hit.num_tokens:
            self._check_pages(request, tables, hit.num_tokens, hit.num_tokens)
        self._write(request, tables, hit.num_tokens, hit.num_tokens + n)
        request.num_computed_tokens = hit.num_tokens + n
        self.kv.cache_full_pages(request)
        self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8), new_token=st.integers(0, 2))
    def step(self, data, chunk, new_token):
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(new_token)  # a decode step feeds the sampled token
        start = request.num_computed_tokens
        n = min(chunk, request.num_tokens - start)
        tables = self.kv.allocate_slots(request, n)
        if tables is None:
            return
        self._write(request, tables, start, start + n)
        request.num_computed_tokens += n
        self.kv.cache_full_pages(request)
        self._check_pages(request, tables, start, request.num_computed_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(request)

    @rule(n=st.integers(1, 4))
    def squeeze(self, n):
        """Another user of the pool takes pages (evicting cached ones) and gives them back."""
        for group in self.kv.groups:
            taken = group.pool.allocate(min(n, group.pool.num_free))
            group.pool.free(taken)

    @invariant()
    def reference_counts_match_holders(self):
        for g, group in enumerate(self.kv.groups):
            held = sum(self.kv.num_held_pages(r)[g] for r in self.live.values())
            assert sum(group.pool.ref_count(p) for p in range(group.pool.num_pages)) == held
            assert group.pool.num_free + group.pool.num_used == group.pool.num_pages

    def teardown(self):
        for request in self.live.values():
            self.kv.free(request)
        for group in self.kv.groups:
            assert group.pool.num_free == group.pool.num_pages


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
