"""The engine end to end on a tiny random model and a sentencepiece tokenizer trained here: chat
requests through the channel machine, conversation turns from the prefix cache, cancellation,
input errors before queueing, the background loop (sync and asyncio), deadlines, the store."""

import asyncio
import copy
import functools
import json

import pytest

from model.chat_template import ChatTemplate
from model.tokenizer import Tokenizer
from serve import events as ev
from serve.engine import Engine, EngineRequest
from serve.grammar import FunctionTool
from serve.request import SamplingParams
from test_runner import VOCAB, random_prompts, tiny_model

LINES = ["The quick brown fox jumps over the lazy dog.", "Let me think step by step: 2 + 2 = 4.",
         "The answer is 42 because 6 * 7 = 42.", '{"name": "add", "arguments": {"a": 1, "b": 2}}',
         "You are a careful assistant who solves math problems.", "hello world, how are you?"] * 20
SYSTEM = ("You are a careful assistant who solves math problems. Think step by step, check every "
          "answer twice and say the answer at the end.")
PAGE = 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_sentencepiece(LINES, 360)


def make_engine(**kw) -> Engine:
    tok = tiny_tokenizer()
    opts = dict(num_pages=256, page_size=PAGE, max_num_seqs=32, max_num_batched_tokens=64,
                prefill_chunk_size=16)
    opts.update(kw)
    assert tok.vocab_size == VOCAB
    return Engine(tiny_model(), tok, **opts)


def chat(text: str, **kw) -> EngineRequest:
    return EngineRequest(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                         effort="none", **kw)


def test_chat_request_streams_typed_events_with_usage():
    engine = make_engine()
    h = engine.submit(chat("What is 2 + 2?", params=SamplingParams(max_tokens=20, temperature=0.0)))
    engine.run_until_idle()
    assert h.finished and isinstance(h.events[-1], ev.Finished)
    assert sum(isinstance(e, ev.Finished) for e in h.events) == 1
    u = h.usage
    assert u.input_tokens == len(h.prompt_token_ids) and u.output_tokens == len(h.output_token_ids)
    assert h.finish_reason in ("stop", "length")
    assert h.finish_reason != "length" or len(h.output_token_ids) == 20
    assert list(iter(h)) == h.events  # the queue delivers the same stream
    stored = engine.get_response(h.request_id)
    assert stored.output_token_ids == tuple(h.output_token_ids)
    assert stored.messages[-1]["role"] == "assistant"
    assert engine.kv.pool.num_used == 0


def test_named_tool_choice_is_enforced_by_the_on_device_mask():
    engine = make_engine()
    add = FunctionTool("add", {"type": "object", "properties": {"a": {"type": "integer"}},
                               "required": ["a"], "additionalProperties": False})
    h = engine.submit(chat("add", tools=[add], tool_choice="add",
                           params=SamplingParams(max_tokens=40, temperature=0.0)))
    engine.run_until_idle()
    names = [e.name for e in h.events if isinstance(e, ev.ToolCallName)]
    assert names == ["add"]  # a random model only calls it because the mask leaves no other way
    for e in h.events:
        if isinstance(e, ev.ToolCallDone):
            assert isinstance(json.loads(e.arguments)["a"], int)


def test_second_turn_prefills_only_the_new_tokens():
    engine = make_engine()
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    h1 = engine.submit(chat("What is 6 * 7?", params=greedy))
    engine.run_until_idle()
    first = engine.get_response(h1.request_id)
    h2 = engine.submit(EngineRequest(messages=[{"role": "user", "content": "And 2 + 2?"}],
                                     previous_response_id=h1.request_id, effort="none", params=greedy))
    engine.run_until_idle()
    prefix = len(first.token_ids)
    assert h2.prompt_token_ids[:prefix] == first.token_ids
    new = len(h2.prompt_token_ids) - prefix
    computed = h2.request.total_computed_tokens
    # Only the new tokens, the earlier turn's last partial page and the fed-back outputs.
    assert computed <= new + PAGE + len(h2.output_token_ids), (computed, new)
    assert h2.usage.cached_input_tokens >= prefix - PAGE
    assert h1.request.total_computed_tokens >= len(h1.prompt_token_ids)
    # Raw token continuation works the same way.
    h3 = engine.submit(EngineRequest(prompt_token_ids=[5, 6, 7], previous_response_id=h2.request_id,
                                     channels=False, params=greedy))
    engine.run_until_idle()
    assert h3.request.num_cached_tokens >= len(engine.get_response(h2.request_id).token_ids) - PAGE


def test_cancelling_100_requests_mid_stream_returns_every_page():
    engine = make_engine(num_pages=512, max_num_seqs=32)
    prompts = random_prompts(100, seed=7)
    handles = [engine.submit(EngineRequest(prompt_token_ids=p, channels=False,
                                           params=SamplingParams(max_tokens=50, temperature=0.0)))
               for p in prompts]
    engine.run_until_idle(max_steps=8)
    assert any(h.output_token_ids for h in handles) and engine.kv.pool.num_used > 0
    for h in handles:
        engine.cancel(h.request_id)
    engine.step()
    assert all(h.finish_reason == "cancelled" for h in handles)
    for group in engine.kv.groups:
        assert group.pool.num_free == group.pool.num_pages
    assert not engine.has_work() and engine.stats().num_running == 0


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("req, match", [
    (EngineRequest(prompt_token_ids=[1] * 1100, channels=False), "context"),
    (chat("hi", reasoning_budget=0, ), "reasoning_budget|effort"),
    (EngineRequest(messages=[{"role": "user", "content": "hi"}], effort="low", reasoning_budget=-3), "reasoning_budget"),
    (chat("hi", tools=[WEATHER], tool_choice="stock_price"), "stock_price"),
    (chat("hi", response_format={"type": "object", "properties": 5}), "response_format|schema|properties"),
    (chat("hi", tool_choice="required"), "required"),
    (chat("hi", previous_response_id="resp_missing"), "previous_response_id"),
    (EngineRequest(messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1]), "exactly one"),
    (EngineRequest(prompt_token_ids=[1, 2, 10_000], channels=False), "vocabulary"),
])
def test_bad_input_is_refused_before_anything_is_queued(req, match):
    engine = make_engine()
    with pytest.raises(ValueError, match=match):
        engine.submit(req)
    assert not engine.has_work()


def test_tools_are_refused_when_the_chat_template_would_drop_them():
    """A template that ignores ``tools`` (SmolLM2-135M-Instruct's) would hide the functions from
    the model: a request offering them is refused, the same conversation without them is served."""
    tok = copy.copy(tiny_tokenizer())
    tok.chat_template = ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = Engine(tiny_model(), tok, num_pages=64, page_size=PAGE, max_num_seqs=4)
    with pytest.raises(ValueError, match="does not show tools"):
        engine.submit(chat("weather in Oslo?", tools=[WEATHER], channels=False))
    assert not engine.has_work()
    engine.submit(chat("weather in Oslo?", channels=False, params=SamplingParams(max_tokens=2)))
    assert engine.has_work()


def test_non_positive_budget_is_refused_at_construction():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_pool_too_small_for_one_request_is_refused():
    engine = make_engine(num_pages=4)
    with pytest.raises(ValueError, match="pages"):
        engine.submit(EngineRequest(prompt_token_ids=[1] * 30, channels=False))
    assert not engine.has_work()


def test_background_loop_serves_sync_and_asyncio_clients():
    engine = make_engine()
    engine.start()
    try:
        greedy = SamplingParams(max_tokens=8, temperature=0.0)
        h1 = engine.submit(EngineRequest(prompt_token_ids=[3, 4, 5], channels=False, params=greedy))
        h2 = engine.submit(EngineRequest(prompt_token_ids=[3, 4, 5], channels=False, params=greedy))
        sync_events = list(h1)

        async def consume():
            return [e async for e in h2.events_async()]

        async_events = asyncio.run(consume())
    finally:
        engine.stop()
    assert isinstance(sync_events[-1], ev.Finished) and isinstance(async_events[-1], ev.Finished)
    assert h1.output_token_ids == h2.output_token_ids and len(h1.output_token_ids) == 8
    assert engine.stats().num_output_tokens == 16


def test_deadline_and_store_eviction():
    now = [0.0]
    engine = make_engine(max_stored_responses=2, clock=lambda: now[0])
    slow = engine.submit(EngineRequest(prompt_token_ids=[9, 9], channels=False, deadline=5.0,
                                       params=SamplingParams(max_tokens=100, temperature=0.0)))
    engine.run_until_idle(max_steps=3)
    now[0] = 10.0
    engine.run_until_idle()
    assert slow.finish_reason == "deadline" and 0 < len(slow.output_token_ids) < 100
    ids = []
    for i in range(3):
        h = engine.submit(EngineRequest(prompt_token_ids=[i + 1], channels=False,
                                        params=SamplingParams(max_tokens=2, temperature=0.0)))
        engine.run_until_idle()
        ids.append(h.request_id)
    assert engine.get_response(ids[0]) is None and engine.get_response(ids[2]) is not None
    with pytest.raises(ValueError, match="evicted"):
        engine.submit(EngineRequest(prompt_token_ids=[1], previous_response_id=ids[0], channels=False))
    assert engine.delete_response(ids[2]) and engine.get_response(ids[2]) is None


def test_engine_greedy_equals_each_request_alone():
    prompts = random_prompts(12, seed=9)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    engine = make_engine()
    hs = [engine.submit(EngineRequest(prompt_token_ids=p, channels=False, params=greedy)) for p in prompts]
    engine.run_until_idle()
    alone = make_engine(enable_prefix_caching=False)
    for p, h in zip(prompts[:3], hs):
        a = alone.submit(EngineRequest(prompt_token_ids=p, channels=False, params=greedy))
        alone.run_until_idle()
        assert a.output_token_ids == h.output_token_ids
    assert len({tuple(h.output_token_ids) for h in hs}) > 6


def test_continuing_a_turn_with_reasoning_and_tools_writes_only_the_new_turn():
    # Qwen3's template drops the reasoning of turns before the last user message, so rendering the
    # real history twice is not a prefix pair; the continuation must still be the plain new turn,
    # without a second system block or tools header.
    engine = make_engine()
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    before = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 6 * 7?"},
              {"role": "assistant", "content": "42", "reasoning_content": "6 * 7 = 42."}]
    for new, want in (([{"role": "user", "content": "And 2 + 2?"}],
                       "\n<|im_start|>user\nAnd 2 + 2?<|im_end|>\n<|im_start|>assistant\n"),
                      ([{"role": "tool", "tool_call_id": "c", "content": "4"}],
                       "\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"
                       "<|im_start|>assistant\n")):
        assert engine._continuation(before, new, tools, {}) == want


def test_the_effort_reaches_the_chat_template_as_its_hint():
    """A request's effort is the template's ``reasoning_effort`` (the line a model trained to heed it
    reads); ``none``, raw requests and a caller's own chat_kwargs are left alone."""
    engine = make_engine()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    tok = tiny_tokenizer()

    def prompt(**kw) -> str:
        h = engine.submit(EngineRequest(messages=[{"role": "user", "content": "hi"}], params=params, store=False, **kw))
        engine.run_until_idle()
        return tok.decode(h.prompt_token_ids)

    assert "Reasoning effort: low." in prompt(effort="low")
    assert "Reasoning effort: auto." in prompt(effort="auto")
    assert "Reasoning effort" not in prompt(effort="none")
    assert "Reasoning effort: high." in prompt(effort="low", chat_kwargs={"reasoning_effort": "high"})
    assert prompt(effort="medium") == tok.decode(tok.encode(tok.render_chat(
        [{"role": "user", "content": "hi"}], reasoning_effort="medium")))
