"""Speculative decoding in the engine: greedy output identical with and without drafts (prompt
lookup, a draft model with the target's weights, a poor random draft), for raw requests and for
channel requests that reason, hit their budget and call tools; usage counts; pages after
cancellation and preemption; the per-request switch, auto-off, and a draft with another
tokenizer refused at engine start."""

import functools

import pytest

from model.tokenizer import Tokenizer
from model.transformer import Transformer
from serve import events as ev
from serve.request import SamplingParams
from serve.speculative import SpeculativeConfig
from serve.engine import Engine, EngineRequest
from test_engine import LINES, PAGE, tiny_tokenizer
from test_runner import random_prompts, tiny_model

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
THINK_ID = 6  # the engine tests' tokenizer: <think>


class _Thinker(Transformer):
    """The tiny random model with a bonus on <think>, so chat requests open their reasoning (a
    random model never would) and run into their budget's forced hand-off."""

    def logits(self, hidden):
        return super().logits(hidden).at[..., THINK_ID].add(40.0)


@functools.lru_cache(maxsize=None)
def thinker(seed: int = 0) -> Transformer:
    model = tiny_model(seed=seed)
    clone = object.__new__(_Thinker)
    clone.__dict__.update(model.__dict__)
    return clone


def make_engine(model=None, **kw) -> Engine:
    opts = dict(num_pages=256, page_size=PAGE, max_num_seqs=32, max_num_batched_tokens=256,
                prefill_chunk_size=128)
    opts.update(kw)
    return Engine(model or tiny_model(), tiny_tokenizer(), **opts)


def ngram(**kw) -> SpeculativeConfig:
    return SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_max=3,
                             prompt_lookup_min=1, **kw)


def draft(model, **kw) -> SpeculativeConfig:
    return SpeculativeConfig("draft", num_speculative_tokens=3, draft_model=model,
                             draft_tokenizer=tiny_tokenizer(), **kw)


def raw(prompts, params=GREEDY, **kw):
    return [EngineRequest(prompt_token_ids=p, channels=False, params=params, **kw) for p in prompts]


def run(requests, **engine_kw):
    engine = make_engine(**engine_kw)
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    for group in engine.kv.groups:  # nothing leaks: every page is back (cached ones evictable)
        assert group.pool.num_free == group.pool.num_pages
    return engine, handles


def quoting_prompts(n: int, seed: int = 3):
    """Prompts that repeat themselves, so prompt lookup finds drafts."""
    return [p + p + p[: len(p) // 2] for p in random_prompts(n, lo=6, hi=14, seed=seed)]


def assert_same_streams(plain, spec):
    for a, b in zip(plain, spec):
        assert b.output_token_ids == a.output_token_ids
        assert b.finish_reason == a.finish_reason
        assert [e for e in b.events if not isinstance(e, ev.Finished)] == \
               [e for e in a.events if not isinstance(e, ev.Finished)]


def assert_usage_adds_up(engine, handles):
    drafted = accepted = 0
    for h in handles:
        u = h.usage
        assert u.output_tokens == len(h.output_token_ids)
        assert u.accepted_prediction_tokens <= u.output_tokens
        drafted += u.accepted_prediction_tokens + u.rejected_prediction_tokens
        accepted += u.accepted_prediction_tokens
    stats = engine.stats()
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (drafted, accepted)
    return drafted, accepted


def test_prompt_lookup_greedy_equals_plain_decoding_for_concurrent_requests():
    prompts = quoting_prompts(3)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    _, plain = run(raw(prompts, params))
    engine, spec = run(raw(prompts, params), speculative=ngram())
    assert_same_streams(plain, spec)
    drafted, accepted = assert_usage_adds_up(engine, spec)
    assert drafted > 0 and accepted > 0
    # Fewer target passes than tokens: accepted drafts came out of verification steps.
    assert engine.num_steps < max(len(h.output_token_ids) for h in plain) + 10


def test_draft_model_with_the_targets_weights_is_always_accepted_and_exact():
    prompts = random_prompts(5, lo=4, hi=30, seed=11)
    _, plain = run(raw(prompts))
    engine, spec = run(raw(prompts), speculative=draft(tiny_model()))
    assert_same_streams(plain, spec)
    drafted, accepted = assert_usage_adds_up(engine, spec)
    assert drafted > 0 and accepted == drafted  # identical weights: every draft is the argmax


@pytest.mark.slow  # compiles a target and a draft runner of its own; the runner test covers prefill/decode
def test_token_shift_target_and_draft_are_exact_under_speculation():
    """A token-shift model verifies k drafts at once and drafts k ahead of its history: each fed
    token still gets the token before it."""
    shift = tiny_model(token_shift=True)
    prompts = quoting_prompts(3)
    _, plain = run(raw(prompts), model=shift)
    engine, spec = run(raw(prompts), model=shift, speculative=ngram())
    assert_same_streams(plain, spec)
    assert assert_usage_adds_up(engine, spec)[1] > 0
    engine, spec = run(raw(prompts), model=shift, speculative=draft(shift))
    assert_same_streams(plain, spec)
    drafted, accepted = assert_usage_adds_up(engine, spec)
    assert drafted > 0 and accepted == drafted


def test_poor_draft_model_is_exact_and_switched_off_by_its_acceptance_rate():
    prompts = random_prompts(3, lo=4, hi=30, seed=12)
    params = SamplingParams(max_tokens=60, temperature=0.0)
    _, plain = run(raw(prompts, params))
    engine, spec = run(raw(prompts, params),
                       speculative=draft(tiny_model(seed=5), min_acceptance_rate=0.5, acceptance_window=6))
    assert_same_streams(plain, spec)
    drafted, accepted = assert_usage_adds_up(engine, spec)
    assert accepted < 0.5 * drafted
    # Each request stops drafting after the first window it judges poor: <= 2 steps of 3 drafts.
    assert all(h.usage.accepted_prediction_tokens + h.usage.rejected_prediction_tokens <= 6 for h in spec)


def chat_requests():
    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    msgs = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    p = SamplingParams(max_tokens=40, temperature=0.0)
    return [
        EngineRequest(messages=msgs("Think, then answer: 6 * 7?"), effort="low", reasoning_budget=30, params=p),
        EngineRequest(messages=msgs("Weather in Paris?"), effort="low", reasoning_budget=26, tools=[weather],
                      tool_choice="required", params=p),
        EngineRequest(messages=msgs("The answer as JSON"), effort="low", reasoning_budget=24, params=p,
                      response_format={"type": "object", "properties": {"n": {"type": "integer"}}}),
    ]


@pytest.mark.parametrize("method", [pytest.param("ngram", marks=pytest.mark.slow), "draft"])
def test_channel_requests_reason_hit_the_budget_and_call_tools_exactly_as_without_drafts(method):
    model = thinker()
    _, plain = run(chat_requests(), model=model)
    # The scenario the test is about: reasoning closed by the forced hand-off, then a tool call.
    assert [e.forced for e in plain[0].events if isinstance(e, ev.ReasoningDone)] == [True]
    assert any(isinstance(e, ev.ToolCallName) for e in plain[1].events)
    spec_cfg = ngram() if method == "ngram" else draft(thinker())
    engine, spec = run(chat_requests(), model=model, speculative=spec_cfg)
    assert_same_streams(plain, spec)
    for a, b in zip(plain, spec):  # channel counts too (acceptance aside)
        keep = lambda u: (u.reasoning_tokens, u.answer_tokens, u.tool_call_tokens, u.tool_argument_tokens)  # noqa: E731
        assert keep(b.usage) == keep(a.usage)
    drafted, accepted = assert_usage_adds_up(engine, spec)
    assert accepted > 0


def test_per_request_switch_penalties_and_logprobs_decode_without_drafts():
    prompts = quoting_prompts(3, seed=4)
    reqs = [EngineRequest(prompt_token_ids=prompts[0], channels=False, params=GREEDY, speculative=False),
            EngineRequest(prompt_token_ids=prompts[1], channels=False,
                          params=SamplingParams(max_tokens=32, temperature=0.0, logprobs=True)),
            EngineRequest(prompt_token_ids=prompts[2], channels=False,
                          params=SamplingParams(max_tokens=32, temperature=0.0, repetition_penalty=1.3))]
    engine, hs = run(reqs, speculative=ngram())
    assert engine.stats().num_draft_tokens == 0
    assert all(h.usage.rejected_prediction_tokens == 0 for h in hs)


def test_plain_decodes_ride_in_the_verification_pass_and_sample_as_without_it():
    prompts = quoting_prompts(3, seed=9)
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, seed=7)
    reqs = lambda: [*raw(prompts[:1], GREEDY), *raw(prompts[1:2], GREEDY, speculative=False),  # noqa: E731
                    *raw(prompts[2:], sampled, speculative=False)]
    _, plain = run(reqs())
    engine, spec = run(reqs(), speculative=ngram())
    assert engine.stats().num_draft_tokens > 0
    # The seeded sampled request and the greedy one draw exactly as in the plain engine.
    assert_same_streams(plain, spec)
    # One target pass per step: the prompts prefill together in step 1, then every step's
    # drafted and undrafted rows share one verification pass (no second, plain decode pass).
    assert engine.runner.num_steps == engine.num_steps


@pytest.mark.slow
def test_preemption_under_speculation_changes_nothing():
    prompts = quoting_prompts(8, seed=6)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    _, plain = run(raw(prompts, params))
    # A pool so small that verification slots force preemptions; outputs stay exact.
    engine, spec = run(raw(prompts, params), num_pages=48, speculative=ngram())
    assert engine.stats().num_preemptions > 0 and engine.stats().num_draft_tokens > 0
    assert_same_streams(plain, spec)


def test_cancel_mid_speculation_leaves_no_page_behind():
    prompts = quoting_prompts(8, seed=6)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    engine = make_engine(speculative=draft(tiny_model()))
    hs = [engine.submit(r) for r in raw(prompts, params)]
    for _ in range(6):
        engine.step()
    assert engine.stats().num_draft_tokens > 0 and engine.kv.pool.num_used > 0
    for h in hs:
        engine.cancel(h.request_id)
    engine.step()
    assert all(h.finish_reason == "cancelled" for h in hs)
    for group in engine.kv.groups:
        assert group.pool.num_free == group.pool.num_pages
    assert not engine.runner.proposer._fed  # the draft's per-request state went with them


def test_draft_model_with_another_tokenizer_is_refused_at_engine_start():
    other = Tokenizer.train_sentencepiece(list(reversed(LINES)) + ["zebra quartz"] * 20, 360)
    with pytest.raises(ValueError, match="tokenizer"):
        make_engine(speculative=SpeculativeConfig("draft", draft_model=tiny_model(), draft_tokenizer=other))
    with pytest.raises(ValueError, match="vocabulary has 300 entries"):
        make_engine(speculative=SpeculativeConfig("draft", draft_model=tiny_model(vocab=300),
                                                  draft_tokenizer=tiny_tokenizer()))
    with pytest.raises(ValueError, match="needs a draft_model"):
        SpeculativeConfig("draft")


@pytest.mark.slow
def test_sampled_requests_with_drafts_finish_and_count_usage():
    prompts = quoting_prompts(2, seed=8)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1)
    engine, hs = run(raw(prompts, params), speculative=draft(tiny_model()))
    drafted, accepted = assert_usage_adds_up(engine, hs)
    assert drafted > 0 and accepted == drafted  # p == q: min(1, p/q) = 1, nothing is rejected
    assert all(len(h.output_token_ids) == 12 or h.finish_reason == "stop" for h in hs)


def test_pointer_target_is_exact_under_speculation():
    """A pointer model (``model/pointer.py``) verifies k drafts in one pass: each of a row's last
    T positions copies from its pages up to itself, drafts included."""
    model = tiny_model(token_shift=True, pointer_dim=8)
    prompts = quoting_prompts(3)
    _, plain = run(raw(prompts), model=model)
    engine, spec = run(raw(prompts), model=model, speculative=ngram())
    assert_same_streams(plain, spec)
    assert assert_usage_adds_up(engine, spec)[1] > 0
