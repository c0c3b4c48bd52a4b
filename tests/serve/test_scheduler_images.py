"""Chunked prefill around image spans: a chunk never ends inside one (its tokens attend to each
other bidirectionally), a span longer than a chunk is refused at add, and page keys hold the image."""

import pytest

from serve.kv_pages import KVCacheManager, PagePool
from serve.request import MultiModalSpan, Request, SamplingParams
from serve.scheduler import Scheduler, chunk_within_spans

PAGE = 4


def make(chunk=8, budget=64, **kw):
    return Scheduler(KVCacheManager(PagePool(64, PAGE)), 4, budget, chunk, **kw)


def image_request(rid="r", offset=6, length=4, n=20, image="a"):
    return Request(rid, tuple(range(1, n + 1)), SamplingParams(max_tokens=2),
                   mm_spans=(MultiModalSpan(offset, length, image),))


def chunks(sched, steps=6):
    """(start, length) of each step's chunk of the only request, sampling token 0 when due."""
    out = []
    for _ in range(steps):
        o = sched.schedule()
        out += [(e.start_position, len(e.token_ids)) for e in o.scheduled]
        sched.update(o, {e.request_id: 0 for e in o.scheduled if e.samples})
    return out


def test_chunk_ends_before_a_span_it_would_split():
    sched = make()
    sched.add(image_request())
    # [0, 8) would end inside the span [6, 10): cut to 6; then the span whole, then the rest.
    assert chunks(sched, 3)[:3] == [(0, 6), (6, 8), (14, 6)]


@pytest.mark.parametrize("start, n, want", [
    (0, 8, 6),   # ends inside: cut before the span
    (0, 10, 10),  # ends exactly at the span's end
    (0, 5, 5),   # ends before the span
    (6, 3, 0),   # starts at the span, rest does not fit: wait
    (8, 2, 2),   # starts inside (the head came from the cache) and takes the rest
    (8, 1, 0),
])
def test_chunk_within_spans(start, n, want):
    assert chunk_within_spans(image_request(), start, n) == want


def test_span_longer_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="an image of 9 tokens does not fit one prefill chunk of 8"):
        make().add(image_request(length=9))


def test_a_span_waits_for_budget_instead_of_splitting():
    sched = make(chunk=8, budget=8)
    sched.add(Request("text", (1, 2, 3), SamplingParams(max_tokens=4)))
    sched.add(image_request("img", offset=4, length=8, n=16))
    image_chunks, waited = [], 0
    for _ in range(8):
        out = sched.schedule()
        got = {e.request_id: (e.start_position, len(e.token_ids)) for e in out.scheduled}
        if "img" in got:
            image_chunks.append(got["img"])
        elif "text" in got and image_chunks:
            waited += 1  # a decode took budget the rest of the span needs
        sched.update(out, {e.request_id: 0 for e in out.scheduled if e.samples})
    assert image_chunks[:3] == [(0, 4), (4, 8), (12, 4)]
    assert waited >= 1


def test_page_keys_hold_the_image():
    kv = KVCacheManager(PagePool(64, PAGE))
    a, b, c = image_request("a", image="x"), image_request("b", image="y"), image_request("c", image="x")
    ha, hb, hc = (kv.page_hashes(r, 4) for r in (a, b, c))
    assert ha[0] == hb[0]  # page 0 holds tokens 0..3, before the image
    assert ha[1] != hb[1] and ha[2] != hb[2] and ha[3] != hb[3]  # the image's pages and every later one
    assert ha == hc
