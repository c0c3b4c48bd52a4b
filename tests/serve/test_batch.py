"""Offline batch processing: OpenAI batch JSONL in and out, a shared system prompt computed once."""

import json

import pytest

from kestrel.errors import KestrelError
from serve.batch import read_batch, run_batch
from test_engine import PAGE, SYSTEM, make_engine, tiny_tokenizer

LONG_SYSTEM = " ".join([SYSTEM] * 3)


def _line(i: int, **body) -> dict:
    return {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "kestrel", "max_tokens": 4, "temperature": 0, "reasoning_effort": "minimal",
                     "messages": [{"role": "system", "content": LONG_SYSTEM},
                                  {"role": "user", "content": f"Problem {i}: what is {i} + {i}?"}],
                     **body}}


def test_100_problems_sharing_a_system_prompt_compute_it_once(tmp_path):
    lines = [_line(i) for i in range(100)]
    lines[17] = _line(17, tool_choice={"type": "function", "function": {"name": "missing"}})
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    engine = make_engine(num_pages=512)
    summary = run_batch(engine, src, dst, progress=False)

    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [f"task-{i}" for i in range(100)]
    assert out[17]["response"]["status_code"] == 400 and "missing" in out[17]["error"]["message"]
    ok = [o for i, o in enumerate(out) if i != 17]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in ok)
    for o in ok:
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 4
    assert summary.num_requests == 100 and summary.num_failed == 1

    tok = tiny_tokenizer()
    a, b = (tok.encode(tok.render_chat(x["body"]["messages"])) for x in (lines[0], lines[1]))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 100  # the system prompt is long
    # The shared prompt once, then per request its own tail (from the last shared page on) and
    # the fed-back outputs.
    own = summary.prompt_tokens - 99 * shared
    bound = shared + own + 99 * PAGE + summary.completion_tokens
    assert summary.computed_tokens <= bound, (summary.computed_tokens, bound)
    assert summary.computed_tokens < 0.4 * summary.prompt_tokens
    assert summary.cached_prompt_tokens >= 98 * (shared - PAGE)


def test_malformed_batch_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "body": {}}\nnot json\n')
    with pytest.raises(KestrelError, match=":2: not valid JSON"):
        read_batch(bad)
    bad.write_text('{"custom_id": "a", "body": {}, "url": "/v1/embeddings"}\n')
    with pytest.raises(KestrelError, match="only /v1/chat/completions"):
        read_batch(bad)
    with pytest.raises(KestrelError, match="does not exist"):
        read_batch(tmp_path / "missing.jsonl")
