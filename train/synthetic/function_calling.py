"""Function-calling conversations: one call, parallel calls, no call, and multi-turn follow-ups.

Reasoning scheme (regular on purpose)::

    <think> The user asks to <action>[ and to <action>].
    Offered: "<function>"[, "<function>" ...].
    Needed: "<function>" (offered)[, "<function>" (offered)].
    1. <action> -> <function> with <arg> = <value>, ...
    Call <function>[ and <function>]. </think> <tool_call>...</tool_call> [<tool_call>...]
    <tool_response>{"result": "..."}</tool_response> ...
    <think> <function> returned <result>. ... </think>
    Answer: <function>: <result>; ...
    Summary: <one line>

The reasoning's first line copies the requested action(s) from the request; the second copies the
offered functions' names from the tool list, in its order and quoted as it quotes them; the third
writes the name each action needs and right after each name says whether it is offered. A declined
request writes the same three lines with ``(not offered)``. The choice between calling and
declining is so made by one token right after a name that either occurs a few tokens earlier, on
the Offered line, or does not: a short-range look-up instead of one across the whole tool list (on
a full run with only the Needed line, the mark was at chance teacher-forced:
``bench/results/nano_needed_line_s22.json``; a drill with four times as many marks did not learn it
either: ``bench/results/nano_lookup_drill_s23.json``). Half the declined requests are near misses,
sharing the verb or the object with an offered function, so the look-up must match the whole name.

The fake backends answer ``{"result": "<CODE>"}`` with a code drawn from the example's RNG, and
the final answer copies those codes. When no offered function fits, the model says so without a
call. Multi-turn dialogues repeat the earlier call with one argument changed ("now the same for
Rome") or ask for another offered function; only the last turn's calls are in ``meta["calls"]``.
"""

import dataclasses
import json
import random
from typing import Any

from train.synthetic.example import SYSTEM_PROMPT, Example, tool_call
from train.synthetic.function_pool import (
    Function, clauses, random_arguments, random_function, random_value, request, value_text)
from train.synthetic.problem import pick


def _functions(rng: random.Random, level: int, split: str, n: int, max_params: int = 5) -> list[Function]:
    """`n` functions of distinct names, each with 1 to min(`max_params`, 1 + `level`) parameters."""
    out: list[Function] = []
    for _ in range(n):
        n_params = rng.randint(1, min(max_params, 1 + level))
        out.append(random_function(rng, split, n_params, avoid={f.name for f in out}))
    return out


def _describe(f: Function, args: dict[str, Any]) -> str:
    if not args:
        return f"{f.action} -> {f.name} with no arguments"
    return f"{f.action} -> {f.name} with " + ", ".join(f"{k} = {value_text(v)}" for k, v in args.items())


def _asks(funcs: list[Function], calls: list[tuple[Function, dict]], offered: bool | list[bool] = True) -> str:
    """The reasoning's first three lines: ``"The user asks to book the hotel and to get the weather."``,
    the offered names copied from the tool list in its order (``'Offered: "get_weather", "book_hotel".'``)
    and ``'Needed: "book_hotel" (offered), "get_weather" (offered).'``; `offered` says it of every
    call at once or of each."""
    actions = [f"to {f.action}" for f, _ in calls]
    listed = actions[0] if len(actions) == 1 else ", ".join(actions[:-1]) + " and " + actions[-1]
    tools = ", ".join(f'"{f.name}"' for f in funcs)
    marks = offered if isinstance(offered, list) else [offered] * len(calls)
    needed = ", ".join(f'"{f.name}" {"(offered)" if m else "(not offered)"}' for (f, _), m in zip(calls, marks))
    return f"The user asks {listed}.\nOffered: {tools}.\nNeeded: {needed}."


def _call_turn(rng: random.Random, calls: list[tuple[Function, dict]], counter: list[int],
               intro: str) -> tuple[list[dict], list[str]]:
    """The assistant's calls, the tool results and the closing assistant message for one turn."""
    n = len(calls)
    lines = [intro] + [f"{i + 1}. {_describe(f, a)}" for i, (f, a) in enumerate(calls)]
    lines.append("Call " + " and ".join(f.name for f, _ in calls) + ".")
    tcs, results, msgs = [], [], []
    for f, a in calls:
        cid = f"call_{counter[0]}"
        counter[0] += 1
        tcs.append(tool_call(f.name, dict(a), cid))
        code = f"{f.obj[:3].upper()}-{rng.randint(1000, 99999)}"
        results.append(code)
        msgs.append({"role": "tool", "tool_call_id": cid, "content": json.dumps({"result": code})})
    first = {"role": "assistant", "content": "", "reasoning_content": "\n".join(lines), "tool_calls": tcs}
    answer = "; ".join(f"{f.name}: {r}" for (f, _), r in zip(calls, results))
    names = " and ".join(f.name for f, _ in calls)
    check = "\n".join(f"{f.name} returned {r}." for (f, _), r in zip(calls, results))
    done = "The call succeeded." if n == 1 else f"All {n} calls succeeded."
    close = {"role": "assistant", "reasoning_content": f"{check}\n{done}",
             "content": f"Answer: {answer}\nSummary: Called {names} and reported the result{'s' if n > 1 else ''}."}
    return [first, *msgs, close], results


def _meta(task, level, split, answer, summary, calls, prompt_len, kind):
    return {"task": task, "level": level, "answer": answer, "summary": summary, "split": split, "tools": True,
            "answer_kind": kind, "tolerance": 0.0, "prompt_len": prompt_len, "unit": "",
            "calls": [{"name": f.name, "arguments": dict(a)} for f, a in calls]}


def _finish(task, level, split, funcs, messages, calls, prompt_len) -> Example:
    close = messages[-1]["content"]
    answer = close.split("\n")[0].removeprefix("Answer: ")
    summary = close.split("\n")[1].removeprefix("Summary: ")
    return Example(messages=messages, tools=[f.schema() for f in funcs],
                   meta=_meta(task, level, split, answer, summary, calls, prompt_len, "results"))


def _optional_rate(level: int) -> float:
    return 1.0 if level <= 2 else 0.6


def make_single(rng: random.Random, level: int, split: str) -> Example:
    """One request, one call, among `level` (+0/1) offered functions."""
    funcs = _functions(rng, level, split, min(5, level + rng.randint(0, 1)))
    f = pick(rng, funcs)
    args = random_arguments(rng, f, split, optional_rate=_optional_rate(level))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": request(rng, f, args)}]
    turn, _ = _call_turn(rng, [(f, args)], [0], _asks(funcs, [(f, args)]))
    return _finish("fc_single", level, split, funcs, messages + turn, [(f, args)], 2)


def make_parallel(rng: random.Random, level: int, split: str) -> Example:
    """2-3 independent requests in one message, answered by parallel calls."""
    funcs = _functions(rng, level, split, min(5, level + 1))
    n = 2 if level < 4 else rng.randint(2, 3)
    calls = []
    for _ in range(n):
        f = pick(rng, funcs)
        calls.append((f, random_arguments(rng, f, split, optional_rate=_optional_rate(level))))
    parts = [request(rng, f, a).rstrip(".?") for f, a in calls]
    joiner = pick(rng, (" Also, ", " And ", " Then also: ", " In addition, "))
    text = parts[0] + "." + "".join(joiner + p[0].lower() + p[1:] + "." for p in parts[1:])
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    turn, _ = _call_turn(rng, calls, [0], _asks(funcs, calls))
    return _finish("fc_parallel", level, split, funcs, messages + turn, calls, 2)


def is_near_miss(name: str, offered: list[str]) -> bool:
    """`name` (``verb_object``) shares its verb or its object with one of the `offered` names."""
    verb, obj = name.split("_", 1)
    return any(o.split("_", 1)[0] == verb or o.split("_", 1)[1] == obj for o in offered)


def _near_miss(rng: random.Random, split: str, funcs: list[Function]) -> Function:
    """A function not offered that shares its verb or its object with an offered one."""
    names = {f.name for f in funcs}
    while True:
        base = pick(rng, funcs)
        other = random_function(rng, split, rng.randint(1, 3), avoid=names)
        other = dataclasses.replace(other, verb=base.verb) if rng.random() < 0.5 else \
            dataclasses.replace(other, obj=base.obj)
        if other.name not in names:
            return other


def make_none(rng: random.Random, level: int, split: str) -> Example:
    """A request no offered function can serve (half the time a near miss of one that is): the
    model explains and makes no call."""
    funcs = _functions(rng, level, split, min(5, level + rng.randint(0, 1)))
    if rng.random() < 0.5:
        other = _near_miss(rng, split, funcs)
    else:
        other = random_function(rng, split, rng.randint(1, 3), avoid={f.name for f in funcs})
    args = random_arguments(rng, other, split, optional_rate=1.0)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": request(rng, other, args)}]
    answer = f"I cannot {other.action}: none of the available functions does that."
    summary = f"No offered function can {other.action}, so no call was made."
    messages.append({"role": "assistant",
                     "reasoning_content": f"{_asks(funcs, [(other, args)], offered=False)}\n"
                                          f"None of them can {other.action}, so I make no call.",
                     "content": f"Answer: {answer}\nSummary: {summary}"})
    return Example(messages=messages, tools=[f.schema() for f in funcs],
                   meta=_meta("fc_none", level, split, answer, summary, [], 2, "refusal"))


def make_multiturn(rng: random.Random, level: int, split: str) -> Example:
    """2 turns (3 from level 4); later turns change one argument of the last call or call anew."""
    funcs = _functions(rng, level, split, min(5, level + 1))
    f = pick(rng, funcs)
    args = random_arguments(rng, f, split, optional_rate=_optional_rate(level))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": request(rng, f, args)}]
    counter = [0]
    turn, _ = _call_turn(rng, [(f, args)], counter, _asks(funcs, [(f, args)]))
    messages += turn
    calls = [(f, args)]
    for _ in range(1 if level < 4 else 2):
        prev_f, prev_args = calls[0]
        if prev_args and rng.random() < 0.7:
            key = pick(rng, sorted(prev_args))
            param = next(p for p in prev_f.params if p.name == key)
            new = random_value(rng, param, split)
            while new == prev_args[key] and param.kind != "boolean":
                new = random_value(rng, param, split)
            if new == prev_args[key]:
                new = not new
            args = {**prev_args, key: new}
            text = pick(rng, ("Now do the same with {c}.", "Great. Same again but {c}.",
                              "Repeat that with {c} instead.", "And once more for {c}."))
            text = text.format(c=clauses({key: new}))
            intro = f"The user asks to repeat {prev_f.name} with {key} changed; the other arguments stay."
            calls = [(prev_f, args)]
        else:
            g = pick(rng, funcs)
            args = random_arguments(rng, g, split, optional_rate=_optional_rate(level))
            ask = request(rng, g, args)
            text = pick(rng, ("Thanks. Next, ", "OK. Now ", "Also ")) + ask[0].lower() + ask[1:]
            calls = [(g, args)]
            intro = _asks(funcs, calls)
        messages.append({"role": "user", "content": text})
        prompt_len = len(messages)
        turn, _ = _call_turn(rng, calls, counter, intro)
        messages += turn
    return _finish("fc_multiturn", level, split, funcs, messages, calls, prompt_len)


def make_lookup(rng: random.Random, level: int, split: str) -> Example:
    """The look-up drill: several actions asked at once about 1-5 offered functions, answered with
    the function-calling turn's three opening lines (the actions, the ``Offered:`` names, and per
    action the ``Needed:`` name and whether the tool list holds it), and no call.

    A function-calling turn chooses between calling and declining at one token, the mark right
    after the needed name; a full run learned that choice no better than chance, teacher-forced,
    even on training-split requests (``bench/results/nano_needed_line_s22.json``), from one such
    token per request. A drill asks 2 to 6 actions under a short tool list (1-2 parameters a
    function), so each carries as many marks: 44% of them offered functions, the rest mostly near
    misses (the verb or the object of an offered one). A full run with it at weight 2 did not learn
    the mark even on this drill's training split (``bench/results/nano_lookup_drill_s23.json``), so
    ``configs/nano.py`` leaves it out."""
    funcs = _functions(rng, level, split, rng.randint(1, 5), max_params=2)
    asked: list[Function] = []
    for _ in range(rng.randint(2, min(6, 2 + level))):
        taken = {f.name for f in funcs + asked}
        unasked = [f for f in funcs if f not in asked]
        r = rng.random()
        if r < 0.5 and unasked:
            asked.append(pick(rng, unasked))
        elif r < 0.8:
            if (f := _near_miss(rng, split, funcs)).name not in taken:
                asked.append(f)
        else:
            asked.append(random_function(rng, split, 1, avoid=taken))
    names = {f.name for f in funcs}
    marks = [f.name in names for f in asked]
    actions = "; ".join(f.action for f in asked)
    question = pick(rng, ("Which of these can the offered functions do: {l}?",
                          "Check each against the available functions: {l}.",
                          "Can you do these with your functions: {l}?")).format(l=actions)
    hits = [f.name for f, m in zip(asked, marks) if m]
    answer = ", ".join(hits) if hits else "none"
    summary = f"{len(hits)} of {len(asked)} offered."
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": _asks(funcs, [(f, {}) for f in asked], marks),
                 "content": f"Answer: {answer}\nSummary: {summary}"}]
    meta = _meta("lookup", level, split, answer, summary, [], 2, "text")
    return Example(messages=messages, tools=[f.schema() for f in funcs], meta=meta)
