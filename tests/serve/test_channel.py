"""The channel machine driven by scripted and random token streams over a tiny BPE vocabulary."""

import json

import jsonschema
import numpy as np
import pytest

from serve import events as ev
from serve.channel import (HANDOFF_TEXT, MAX_SEPARATOR_BLANKS, ChannelMachine, ChannelSpec, State,
                           fill_masks)
from serve.grammar import FunctionTool, UnsupportedSchemaError, has_bit, unpack_mask
from test_channel_vocab import sample_allowed, tiny_vocab

V = tiny_vocab()
T = V.tag_ids
THINK, END_THINK, CALL, END_CALL, IM_END = (T["<think>"], T["</think>"], T["<tool_call>"],
                                            T["</tool_call>"], T["<|im_end|>"])
WEATHER = FunctionTool("get_weather", {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"], "additionalProperties": False})
ADD = FunctionTool("add", {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                           "required": ["a", "b"]})
TOOLS = {t.name: t for t in (WEATHER, ADD)}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["m", "s"]}},
                 "required": ["answer", "unit"], "additionalProperties": False}


def enc(text: str) -> list[int]:
    return V.encode(text)


def drive(m: ChannelMachine, tokens) -> list:
    out = []
    for t in tokens:
        assert has_bit(m.next_mask(), t), f"token {t} ({V.token_bytes(t)!r}) refused in {m.state}"
        out += m.advance(t)
    return out


def text_of(events, kind) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def calls_of(events):
    return [e for e in events if isinstance(e, ev.ToolCallDone)]


def drive_text(m: ChannelMachine, text: str) -> list:
    """Feeds ``text`` the way a constrained model writes it: at each step the allowed token
    covering the longest prefix of what is left (grammars force canonical tokens)."""
    rest, out = text.encode(), []
    while rest:
        allowed = np.flatnonzero(unpack_mask(m.next_mask(), V.vocab_size))
        # a forced token may run past the end of ``text``
        best = max((t for t in allowed if V.token_bytes(t) and (rest.startswith(V.token_bytes(t))
                                                                 or V.token_bytes(t).startswith(rest))),
                   key=lambda t: min(len(V.token_bytes(t)), len(rest)))
        out += m.advance(best)
        rest = rest[len(V.token_bytes(best)):]
    return out


def call_tokens(name, args) -> list[int]:
    return [CALL] + enc("\n" + json.dumps({"name": name, "arguments": args}) + "\n") + [END_CALL]


# Closing characters first: the stand-in sampler uses them late in a call/answer so random JSON
# terminates; earlier it draws uniformly among the allowed tokens.
_CLOSERS = np.array([(not V.special[i]) and bool(V.token_bytes(i)) and set(V.token_bytes(i)) <= set(b'"}]')
                     for i in range(V.vocab_size)])
_CLOSERS[[END_CALL, IM_END, *V.eos_ids]] = True


def random_run(m: ChannelMachine, rng, *, reasoning_len=20, avoid=(), explore=12, max_steps=3000):
    """Draws each token from the machine's mask; opens reasoning when it may and stays in it
    ~reasoning_len tokens; late in a call or answer prefers closing characters."""
    events, tokens, in_state = [], [], 0
    avoid_mask = np.zeros(V.vocab_size, bool)
    avoid_mask[list(avoid)] = True
    for _ in range(max_steps):
        if m.done:
            return events, tokens
        mask = m.next_mask()
        allowed = unpack_mask(mask, V.vocab_size)
        assert allowed.any(), f"empty mask in {m.state}"
        prefer = ~avoid_mask
        if m.state is State.START and allowed[THINK]:
            prefer = prefer & (np.arange(V.vocab_size) == THINK)
        elif m.state is State.REASONING and in_state < reasoning_len:
            prefer = prefer & ~np.isin(np.arange(V.vocab_size), [END_THINK, CALL])
        elif m.state in (State.TOOL_CALL, State.ANSWER) and in_state > explore:
            prefer = prefer & _CLOSERS
        t = sample_allowed(mask, V, rng, prefer)
        before = m.state
        events += m.advance(t)
        tokens.append(t)
        in_state = in_state + 1 if m.state is before else 0
    raise AssertionError(f"no end after {max_steps} tokens (state {m.state})")


# ------------------------------------------------------------------------------- scripted streams
def test_reasoning_then_answer_events_and_usage_are_exact():
    m = ChannelMachine(V, ChannelSpec(), input_tokens=11, cached_input_tokens=4)
    reasoning, answer = enc("\nLet me think: 6 * 7 = 42.\n"), enc("The answer is 42 (日本).")
    sep = enc("\n\n")
    evs = drive(m, [THINK, *reasoning, END_THINK, *sep, *answer, IM_END])
    assert text_of(evs, ev.ReasoningDelta) == "\nLet me think: 6 * 7 = 42.\n"
    assert text_of(evs, ev.AnswerDelta) == "The answer is 42 (日本)."
    assert ev.ReasoningDone(forced=False) in evs
    kinds = [type(e) for e in evs]
    assert kinds.index(ev.ReasoningDone) < kinds.index(ev.AnswerDelta)
    assert evs[-1] == ev.Finished("stop", ev.Usage(
        input_tokens=11, cached_input_tokens=4, reasoning_tokens=len(reasoning) + 2 + len(sep),
        answer_tokens=len(answer) + 1))
    assert evs[-1].usage.output_tokens == 3 + len(reasoning) + len(sep) + len(answer)
    assert m.done and m.finish_reason == "stop"
    with pytest.raises(ValueError, match="finished"):
        m.advance(IM_END)


def test_tool_calls_stream_name_and_arguments_and_count_tokens():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD)))
    c1 = call_tokens("get_weather", {"city": "Paris", "days": 3})
    c2 = call_tokens("add", {"a": 1.5, "b": -2})
    nl = enc("\n")
    evs = drive(m, [THINK, *enc("use tools"), END_THINK, *c1, *nl, *c2, IM_END])
    assert [e.name for e in evs if isinstance(e, ev.ToolCallName)] == ["get_weather", "add"]
    done = calls_of(evs)
    assert [(d.index, d.name, json.loads(d.arguments)) for d in done] == [
        (0, "get_weather", {"city": "Paris", "days": 3}), (1, "add", {"a": 1.5, "b": -2})]
    for d in done:  # argument deltas add up to the arguments, name event comes before them
        assert "".join(e.text for e in evs if isinstance(e, ev.ToolCallArgumentsDelta) and e.index == d.index) == d.arguments
    u = evs[-1].usage
    assert evs[-1].reason == "tool_calls"
    assert u.tool_call_tokens == len(c1) + len(nl) + len(c2) + 1
    assert u.reasoning_tokens == len(enc("use tools")) + 2 and u.answer_tokens == 0
    args_only = sum(len(enc(json.dumps(a))) for a in ({"city": "Paris", "days": 3}, {"a": 1.5, "b": -2}))
    assert args_only - 2 <= u.tool_argument_tokens <= args_only + 2  # BPE merges at the edges


def test_tool_call_inside_reasoning_ends_reasoning_not_swallowed():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    c = call_tokens("get_weather", {"city": "Oslo"})
    evs = drive(m, [THINK, *enc("I should call"), *c, IM_END])
    assert text_of(evs, ev.ReasoningDelta) == "I should call"
    assert ev.ReasoningDone(forced=False) in evs
    assert [json.loads(d.arguments) for d in calls_of(evs)] == [{"city": "Oslo"}]
    assert "tool_call" not in text_of(evs, ev.ReasoningDelta)


def test_end_think_is_never_taken_by_the_tool_grammar():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    drive(m, [CALL])
    drive_text(m, '\n{"name": ')
    mask = m.next_mask()
    assert not any(has_bit(mask, t) for t in (END_THINK, THINK, IM_END, CALL, END_CALL))
    with pytest.raises(ValueError, match="not allowed"):
        m.advance(END_THINK)


def test_prompt_opening_think_starts_in_reasoning():
    m = ChannelMachine(V, ChannelSpec(prompt_opens_think=True))
    assert m.state is State.REASONING
    evs = drive(m, [*enc("hmm"), END_THINK, *enc("ok"), IM_END])
    assert text_of(evs, ev.ReasoningDelta) == "hmm" and text_of(evs, ev.AnswerDelta) == "ok"
    assert evs[-1].usage.reasoning_tokens == len(enc("hmm")) + 1


def test_answer_always_follows_reasoning():
    m = ChannelMachine(V, ChannelSpec())
    drive(m, [THINK, *enc("x")])
    assert not any(has_bit(m.next_mask(), t) for t in V.eos_ids)
    drive(m, [END_THINK])
    assert not any(has_bit(m.next_mask(), t) for t in V.eos_ids)
    assert not has_bit(m.next_mask(), THINK)  # one reasoning block


def test_finish_from_outside_flushes_and_reports_length():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    evs = drive(m, [CALL]) + drive_text(m, '\n{"name": "get_weather", "arguments": {"ci')
    n = len(m._calls[0].arguments)
    fin = m.finish("length")
    assert fin[-1].reason == "length" and not calls_of(evs + fin)
    assert [e.name for e in evs if isinstance(e, ev.ToolCallName)] == ["get_weather"]
    assert text_of(evs + fin, ev.ToolCallArgumentsDelta).startswith('{"ci') and n >= 4
    assert fin[-1].usage.tool_call_tokens == m.current_usage.tool_call_tokens >= 3
    with pytest.raises(ValueError):
        m.finish("length")


# ------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget", [1, 2, 5, 24, 25, 26, 64])
@pytest.mark.parametrize("opens", [False, True])
def test_budget_forces_handoff_then_answer(budget, opens):
    rng = np.random.default_rng(budget)
    spec = ChannelSpec(effort="auto", reasoning_budget=budget, prompt_opens_think=opens)
    m = ChannelMachine(V, spec)
    # The model never closes its reasoning on its own here.
    evs, toks = random_run(m, rng, reasoning_len=10**9, avoid=[END_THINK, CALL])
    handoff = V.encode(HANDOFF_TEXT)
    short = handoff[handoff.index(END_THINK):]
    u = evs[-1].usage
    first = 0 if opens else 1  # <think>
    if budget >= len(handoff) + first:
        assert u.reasoning_tokens == budget
        assert text_of(evs, ev.ReasoningDelta).endswith(HANDOFF_TEXT.split("</think>")[0])
    else:
        assert u.reasoning_tokens == max(budget, len(short) + first)
    assert ev.ReasoningDone(forced=True) in evs
    assert evs[-1].reason == "stop" and u.answer_tokens >= 1  # an answer followed
    assert u.output_tokens == len(toks)


def test_effort_table_sets_budget_and_none_bans_think():
    assert ChannelSpec(effort="low").budget == 1024
    assert ChannelSpec(effort="high", effort_budgets={"high": 77}).budget == 77
    assert ChannelSpec(effort="medium", reasoning_budget=9).budget == 9
    m = ChannelMachine(V, ChannelSpec(effort="none"))
    assert ChannelSpec(effort="none").budget is None
    assert not has_bit(m.next_mask(), THINK)
    evs = drive(m, [*enc("hi"), IM_END])
    assert evs[-1].usage.reasoning_tokens == 0 and text_of(evs, ev.AnswerDelta) == "hi"


@pytest.mark.parametrize("when", [0, 3, 40])
def test_auto_budget_set_after_prefill_bounds_the_reasoning(when):
    # effort="auto" without a budget reasons under the table's high budget until the engine's
    # predictor calls set_budget (after prefill); a budget already spent closes at once.
    spec = ChannelSpec(effort="auto", effort_budgets={"low": 8, "medium": 16, "high": 500})
    assert spec.budget == 500
    m = ChannelMachine(V, spec)
    rng = np.random.default_rng(when)
    prefix = [THINK] + [int(t) for t in rng.choice(enc("abc def ghi"), size=when)]
    evs = drive(m, prefix)
    m.set_budget(30)
    more, toks = random_run(m, rng, reasoning_len=10**9, avoid=[END_THINK, CALL])
    u = more[-1].usage
    handoff = V.encode(HANDOFF_TEXT)
    short = handoff[handoff.index(END_THINK):]
    assert u.reasoning_tokens == (30 if len(prefix) + len(handoff) <= 30 else max(30, len(prefix) + len(short)))
    assert ev.ReasoningDone(forced=True) in evs + more and u.answer_tokens >= 1
    with pytest.raises(ValueError, match="budget"):
        m.set_budget(0)


def test_natural_close_before_budget_is_not_forced():
    m = ChannelMachine(V, ChannelSpec(effort="auto", reasoning_budget=200))
    evs = drive(m, [THINK, *enc("short"), END_THINK, *enc("done"), IM_END])
    assert ev.ReasoningDone(forced=False) in evs and evs[-1].usage.reasoning_tokens == len(enc("short")) + 2


# ------------------------------------------------------------------------------- tool_choice
def test_tool_choice_none_bans_tool_call_everywhere():
    rng = np.random.default_rng(1)
    for seed in range(5):
        m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), tool_choice="none"))
        while not m.done:
            mask = m.next_mask()
            assert not has_bit(mask, CALL), m.state
            m.advance(sample_allowed(mask, V, rng))
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), tool_choice="none"))
    with pytest.raises(ValueError, match="not allowed"):
        m.advance(CALL)


def test_tool_choice_required_forbids_answer_until_a_call():
    rng = np.random.default_rng(2)
    for _ in range(4):
        m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD), tool_choice="required"))
        drive(m, [THINK, *enc("plan"), END_THINK])
        mask = unpack_mask(m.next_mask(), V.vocab_size)
        assert mask[CALL] and not mask[V.encode("The")[0]] and not mask[IM_END]
        evs, _ = random_run(m, rng)
        assert evs[-1].reason == "tool_calls" and not text_of(evs, ev.AnswerDelta)
        for d in calls_of(evs):
            jsonschema.validate(json.loads(d.arguments), TOOLS[d.name].parameters)


def test_named_tool_choice_allows_only_that_function():
    rng = np.random.default_rng(3)
    names = set()
    for _ in range(6):
        m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD), tool_choice="add", effort="none"))
        assert np.flatnonzero(unpack_mask(m.next_mask(), V.vocab_size)).tolist() == [CALL]
        evs, _ = random_run(m, rng)
        assert calls_of(evs)
        for d in calls_of(evs):
            names.add(d.name)
            jsonschema.validate(json.loads(d.arguments), ADD.parameters)
    assert names == {"add"}
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD), tool_choice="add", effort="none"))
    drive(m, [CALL])
    drive_text(m, '\n{"name": "')
    allowed = {V.token_bytes(t) for t in np.flatnonzero(unpack_mask(m.next_mask(), V.vocab_size))}
    assert allowed and all(b"add".startswith(b) for b in allowed)


def test_auto_tool_choice_model_may_answer_or_call():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    evs = drive(m, [THINK, END_THINK, *enc("No tool needed."), IM_END])
    assert evs[-1].reason == "stop" and text_of(evs, ev.AnswerDelta) == "No tool needed."
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    evs = drive(m, [*enc("Checking."), *call_tokens("get_weather", {"city": "Rome"}), IM_END])
    assert text_of(evs, ev.AnswerDelta) == "Checking." and len(calls_of(evs)) == 1


def test_parallel_tool_calls_false_allows_only_end_after_one_call():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), parallel_tool_calls=False))
    drive(m, call_tokens("get_weather", {"city": "Rome"}))
    allowed = np.flatnonzero(unpack_mask(m.next_mask(), V.vocab_size)).tolist()
    assert allowed == sorted(V.eos_ids)
    with pytest.raises(ValueError, match="not allowed"):
        m.advance(CALL)
    rng = np.random.default_rng(4)
    for _ in range(4):  # random runs never produce a second call
        m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD), tool_choice="required",
                                          parallel_tool_calls=False))
        evs, _ = random_run(m, rng)
        assert len(calls_of(evs)) == 1


def test_parallel_tool_calls_true_allows_more_calls():
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER,)))
    drive(m, call_tokens("get_weather", {"city": "Rome"}))
    for _ in range(MAX_SEPARATOR_BLANKS):
        assert has_bit(m.next_mask(), CALL) and has_bit(m.next_mask(), IM_END)
        drive(m, enc("\n"))
    assert not has_bit(m.next_mask(), enc("\n")[0])  # blanks between calls are bounded


# ------------------------------------------------------------------------------- response_format
def test_response_format_constrains_only_the_answer():
    rng = np.random.default_rng(5)
    free = V.encode("Hmm")[0]
    for _ in range(5):
        m = ChannelMachine(V, ChannelSpec(response_format=ANSWER_SCHEMA))
        drive(m, [THINK])
        assert has_bit(m.next_mask(), free)  # reasoning is free text
        drive(m, [*enc("Hmm, x = 3."), END_THINK])
        assert not has_bit(m.next_mask(), free)  # the answer must be JSON
        evs, _ = random_run(m, rng)
        assert evs[-1].reason == "stop"
        jsonschema.validate(json.loads(text_of(evs, ev.AnswerDelta)), ANSWER_SCHEMA)


def test_response_format_without_reasoning_and_scripted_answer():
    m = ChannelMachine(V, ChannelSpec(response_format=ANSWER_SCHEMA, effort="none"))
    body = '{"answer": 42, "unit": "m"}'
    evs = drive(m, [*enc(body), IM_END])
    assert text_of(evs, ev.AnswerDelta) == body and evs[-1].usage.answer_tokens == len(enc(body)) + 1


# ------------------------------------------------------------------------------- UTF-8 and usage
@pytest.mark.parametrize("seed", range(6))
def test_random_streams_utf8_safe_and_usage_adds_up(seed):
    rng = np.random.default_rng(100 + seed)
    m = ChannelMachine(V, ChannelSpec(tools=(WEATHER, ADD)), input_tokens=7)
    evs, toks = random_run(m, rng, reasoning_len=30)
    fin = evs[-1]
    assert isinstance(fin, ev.Finished) and sum(isinstance(e, ev.Finished) for e in evs) == 1
    assert fin.usage.output_tokens == len(toks) and fin.usage.total_tokens == len(toks) + 7
    # Each channel's deltas are exactly the UTF-8 decoding (with U+FFFD) of its tokens' bytes.
    r_end = toks.index(END_THINK) if END_THINK in toks else (toks.index(CALL) if CALL in toks else 0)
    r_bytes = b"".join(V.token_bytes(t) for t in toks[:r_end])
    assert text_of(evs, ev.ReasoningDelta) == r_bytes.decode("utf-8", errors="replace")
    for e in evs:
        if isinstance(e, (ev.ReasoningDelta, ev.AnswerDelta, ev.ToolCallArgumentsDelta)):
            assert e.text  # no empty deltas
    for d in calls_of(evs):
        jsonschema.validate(json.loads(d.arguments), TOOLS[d.name].parameters)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(effort="auto", reasoning_budget=0), "reasoning_budget must be a positive int"),
    (dict(effort="auto", reasoning_budget=-5), "reasoning_budget must be a positive int"),
    (dict(effort="auto", reasoning_budget=True), "reasoning_budget must be a positive int"),
    (dict(effort="none", reasoning_budget=10), "effort='none'"),
    (dict(effort="extreme"), "effort must be one of"),
    (dict(effort="low", effort_budgets={"low": 0}), "effort_budgets"),
    (dict(tools=(WEATHER,), tool_choice="get_time"), "'get_time', which is not among"),
    (dict(tool_choice="required"), "needs at least one tool"),
    (dict(tools=(WEATHER, WEATHER)), "duplicate"),
    (dict(tools=({"name": "f"},)), "FunctionTool"),
    (dict(response_format={"type": "object", "properties": {"a": {"type": "strin"}}}), "response_format"),
    (dict(effort="none", prompt_opens_think=True), "conflicts"),
])
def test_bad_options_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelSpec(**kwargs)


def test_unenforceable_response_format_lists_keywords():
    with pytest.raises(UnsupportedSchemaError) as e:
        ChannelSpec(response_format={"type": "object", "properties": {
            "a": {"type": "array", "uniqueItems": True}, "b": {"not": {"type": "null"}}}})
    assert set(e.value.keywords) == {"uniqueItems", "not"}


def test_mask_written_into_a_batch_row():
    batch = np.zeros((3, V.n_words), np.int32)
    a = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), tool_choice="required", effort="none"))
    b = ChannelMachine(V, ChannelSpec(effort="none"))
    assert a.next_mask(out=batch[0]) is batch[0] or np.shares_memory(a.next_mask(out=batch[0]), batch)
    b.next_mask(out=batch[2])
    assert np.flatnonzero(unpack_mask(batch[0], V.vocab_size)).tolist() == [CALL]
    assert not batch[1].any() and unpack_mask(batch[2], V.vocab_size)[enc("hi")[0]]
    a.advance(CALL)  # checked against the row it wrote
    with pytest.raises(ValueError, match="out must be"):
        b.next_mask(out=np.zeros(V.n_words, np.int64))


def test_vocab_without_thinking_or_tool_tags():
    import json as _json
    from tokenizers import Tokenizer
    from serve.grammar import ChannelVocab
    from test_channel_vocab import tiny_tokenizer_json
    tj = _json.loads(tiny_tokenizer_json())
    keep = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    for t in tj["added_tokens"]:  # demote the thinking / tool tags to plain (never-sampled) tokens
        if t["content"] not in keep:
            t["content"] = t["content"].replace("<", "[").replace(">", "]")
    plain = ChannelVocab.from_tokenizer_json(Tokenizer.from_str(_json.dumps(tj)).to_str())
    m = ChannelMachine(plain, ChannelSpec(effort="high"))  # no tags: the model just answers
    assert m.state is State.START
    ids = plain.encode("ok")
    for t in ids:
        m.advance(t)
    assert m.advance(plain.tag_ids["<|im_end|>"])[-1].usage.answer_tokens == len(ids) + 1
    with pytest.raises(ValueError, match="tool_call"):
        ChannelMachine(plain, ChannelSpec(tools=(WEATHER,)))
    with pytest.raises(ValueError, match="think"):
        ChannelMachine(plain, ChannelSpec(prompt_opens_think=True))


def test_batch_fill_matches_per_request_masks():
    rng = np.random.default_rng(7)
    specs = [ChannelSpec(tools=(WEATHER, ADD), tool_choice="required", effort="none"),
             ChannelSpec(response_format=ANSWER_SCHEMA, effort="none"), None,
             ChannelSpec(tools=(ADD,)), ChannelSpec(effort="auto", reasoning_budget=30)]
    machines = [ChannelMachine(V, s) if s else None for s in specs]
    out = np.zeros((len(machines), V.n_words), np.int32)
    for _ in range(60):
        live = [m if m is not None and not m.done else None for m in machines]
        if not any(live):
            break
        fill_masks(live, out)
        assert (out[2] == -1).all()
        for i, m in enumerate(live):
            if m is not None:
                row = out[i].copy()
                np.testing.assert_array_equal(row, m.next_mask())
                m.advance(sample_allowed(row, V, rng))
    with pytest.raises(ValueError, match="out must be"):
        fill_masks(machines, np.zeros((2, V.n_words), np.int32))


def test_machines_with_the_same_tools_do_not_share_grammar_state():
    a = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), effort="none"))
    b = ChannelMachine(V, ChannelSpec(tools=(WEATHER,), effort="none"))
    drive(a, [CALL])
    drive(b, [CALL])
    first = b.next_mask().copy()
    drive_text(a, '\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n')
    np.testing.assert_array_equal(b.next_mask(), first)
