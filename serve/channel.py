"""The per-request channel machine: which channel every token is in, which tokens may come next.

States (``prompt_opens_think`` starts in ``reasoning``)::

    start --<think>--> reasoning --</think>--> after_reasoning --blank x<=2-->  (separator)
      |                   |  (budget spent: hand-off sentence + </think> + "\\n\\n" are forced)
      |                   '--<tool_call>--> tool_call   (a call is never swallowed by reasoning)
      +-- text ----------------------------> answer --<|im_end|>/eos--> done  (finish "stop")
      '-- <tool_call> ---------------------> tool_call --</tool_call>--> between_calls
                                             between_calls --<tool_call>--> tool_call (parallel)
                                             between_calls --<|im_end|>/eos--> done ("tool_calls")

``after_reasoning`` accepts what ``start`` does except ``<think>``. Grammars switch on exactly at
channel boundaries: the tool-call grammar between ``<tool_call>`` and ``</tool_call>``, the
``response_format`` grammar from the first answer token, never during reasoning. Every state has
a mask: free states (reasoning, plain answer) reuse masks precomputed at construction (special
tokens the state does not expect are banned, so a stray tag can never desynchronise the machine);
only ``tool_call`` and a constrained answer ask llguidance, once per token.

The engine drives it once per decode step::

    mask = machine.next_mask()        # int32[ceil(V/32)] bitmask; apply to logits, sample
    events = machine.advance(token)   # typed events to stream back
    ...
    machine.finish("length")          # when the engine stops the request itself
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import numpy as np

from serve import events as ev
from serve.grammar import (END_THINK, END_TOOL_CALL, THINK, TOOL_CALL, ChannelVocab, FunctionTool,
                           check_schema, has_bit, clear_bit, response_format_grammar, set_bit,
                           tool_call_grammar)

# Reasoning budgets (tokens, hand-off included) per effort. Sized for Qwen3-class reasoning
# models, whose documented output budget is 32,768 tokens (38,912 for competition problems):
# "high" leaves half of it to reasoning, each step down quarters it. A served model passes its own
# table in ChannelSpec.effort_budgets once calibrated on its reasoning-length distribution.
EFFORT_BUDGETS: Mapping[str, int] = {"low": 1024, "medium": 4096, "high": 16384}
EFFORTS = ("none", "low", "medium", "high", "auto")
TOOL_CHOICES = ("none", "auto", "required")

# Qwen3's documented hand-off when thinking must stop.
HANDOFF_TEXT = ("Considering the limited time by the user, I have to give the solution based on "
                "the thinking directly now.\n</think>\n\n")
# Blank tokens allowed after </think> or between calls (the template's "\n\n" / "\n").
MAX_SEPARATOR_BLANKS = 2


class State(enum.StrEnum):
    START = "start"
    REASONING = "reasoning"
    AFTER_REASONING = "after_reasoning"
    ANSWER = "answer"
    TOOL_CALL = "tool_call"
    BETWEEN_CALLS = "between_calls"
    DONE = "done"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    """What a request asks of its output channels; checked in full on construction.

    Build it when the request arrives: every error (a non-positive budget, an unknown function in
    a named ``tool_choice``, a malformed or unenforceable schema, conflicting options) is a
    ``ValueError`` raised here, before any work is queued.

    Attributes:
        tools: functions the model may call (unique names).
        tool_choice: ``"none"`` (``<tool_call>`` banned), ``"auto"``, ``"required"`` (at least one
            call before the turn ends; no answer text), or a function name (a call to it only).
        parallel_tool_calls: False: after one call only the end of turn is allowed.
        response_format: JSON schema the answer must satisfy (the reasoning stays free).
        effort: ``"none"`` (``<think>`` banned), ``"low"``/``"medium"``/``"high"`` (budget from
            ``effort_budgets``) or ``"auto"`` (budget from a predictor: given as
            ``reasoning_budget``, or set on the machine after prefill with
            ``ChannelMachine.set_budget``; until then ``effort_budgets["high"]`` bounds it).
        reasoning_budget: most reasoning tokens; overrides the effort table.
        effort_budgets: the served model's effort -> budget table.
        prompt_opens_think: the prompt already ends in ``<think>`` (DeepSeek-R1-style templates).
    """

    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    response_format: Mapping[str, Any] | None = None
    effort: str = "medium"
    reasoning_budget: int | None = None
    effort_budgets: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(EFFORT_BUDGETS))
    prompt_opens_think: bool = False

    def __post_init__(self):
        tools = tuple(self.tools)
        object.__setattr__(self, "tools", tools)
        for i, t in enumerate(tools):
            if not isinstance(t, FunctionTool):
                raise ValueError(f"tools[{i}] must be a FunctionTool, got {type(t).__name__}")
        names = [t.name for t in tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tools: duplicate function names {dupes}")
        if not isinstance(self.tool_choice, str) or not self.tool_choice:
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function name, "
                             f"got {self.tool_choice!r}")
        if self.tool_choice not in TOOL_CHOICES and self.tool_choice not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice!r}, which is not among "
                             f"the offered tools {names}")
        if self.tool_choice == "required" and not tools:
            raise ValueError("tool_choice='required' needs at least one tool")
        if not isinstance(self.parallel_tool_calls, bool):
            raise ValueError(f"parallel_tool_calls must be a bool, got {self.parallel_tool_calls!r}")
        if self.response_format is not None:
            check_schema(self.response_format, where="response_format")
        if self.effort not in EFFORTS:
            raise ValueError(f"effort must be one of {EFFORTS}, got {self.effort!r}")
        for k, v in self.effort_budgets.items():
            _positive_int(f"effort_budgets[{k!r}]", v)
        if self.reasoning_budget is not None:
            _positive_int("reasoning_budget", self.reasoning_budget)
            if self.effort == "none":
                raise ValueError("reasoning_budget was given but effort='none' disables reasoning")
        elif self.effort not in ("none",) and self._table_effort not in self.effort_budgets:
            raise ValueError(f"effort_budgets has no entry for effort {self._table_effort!r}")
        if self.prompt_opens_think and self.effort == "none":
            raise ValueError("prompt_opens_think conflicts with effort='none' (reasoning disabled)")

    @property
    def reasoning_enabled(self) -> bool:
        return self.effort != "none"

    @property
    def budget(self) -> int | None:
        """The reasoning budget in tokens; None when reasoning is disabled."""
        if not self.reasoning_enabled:
            return None
        return self.reasoning_budget or self.effort_budgets[self._table_effort]

    @property
    def _table_effort(self) -> str:
        return "high" if self.effort == "auto" else self.effort

    @property
    def tools_allowed(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def call_required(self) -> bool:
        return self.tool_choice not in ("none", "auto")

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        if self.tool_choice in TOOL_CHOICES:
            return self.tools
        return tuple(t for t in self.tools if t.name == self.tool_choice)


class _CallScanner:
    """Follows the text of one call, ``{"name": "<f>", "arguments": {...}}``, as it streams.

    The grammar fixes the layout (name first, ", " and ": " separators, no free whitespace), so
    finding the name and the span of the arguments needs only a depth count that skips strings.
    """

    def __init__(self, index: int):
        self.index = index
        self.name: str | None = None
        self.arguments: list[str] = []
        self._head = ""  # text before the arguments value
        self._phase = "head"  # head -> args -> tail
        self._depth = 0
        self._in_string = self._escape = False

    def feed(self, text: str) -> tuple[list[ev.Event], bool]:
        """Returns the events for ``text`` and whether any of it lies in the arguments."""
        out: list[ev.Event] = []
        args: list[str] = []
        for ch in text:
            if self._phase == "head":
                self._head += ch
                if self.name is None and self._head.endswith('"') and '"name": "' in self._head[:-1]:
                    start = self._head.index('"name": "') + len('"name": "')
                    if len(self._head) - 1 > start:
                        self.name = self._head[start:-1]
                        out.append(ev.ToolCallName(self.index, self.name))
                elif self._head.endswith('"arguments": '):
                    self._phase = "args"
            elif self._phase == "args":
                args.append(ch)
                if self._in_string:
                    if self._escape:
                        self._escape = False
                    elif ch == "\\":
                        self._escape = True
                    elif ch == '"':
                        self._in_string = False
                elif ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._phase = "tail"
        if args:
            self.arguments += args
            out.append(ev.ToolCallArgumentsDelta(self.index, "".join(args)))
        return out, bool(args)


@dataclasses.dataclass(frozen=True)
class _GrammarStep:
    matcher: Any  # llguidance.LLMatcher whose mask is needed
    end_ids: tuple[int, ...]  # what the grammar's "may end here" turns into
    extra: tuple[np.ndarray, ...]  # masks OR-ed in afterwards (e.g. <tool_call>, blanks)


class ChannelMachine:
    """Token-level state machine of one request's output.

    Args:
        vocab: the served model's :class:`ChannelVocab`.
        spec: the request's checked :class:`ChannelSpec`.
        input_tokens: prompt length, for usage.
        cached_input_tokens: prompt tokens served by the prefix cache, for usage.

    Raises:
        ValueError: the vocabulary lacks a tag the spec needs (``<tool_call>``/``</tool_call>``
            for tools, ``<think>``/``</think>`` when the prompt opened reasoning). Without
            thinking tags the model just answers.
    """

    def __init__(self, vocab: ChannelVocab, spec: ChannelSpec, *, input_tokens: int = 0,
                 cached_input_tokens: int = 0):
        self.vocab, self.spec = vocab, spec
        tags = vocab.tag_ids
        # A model without thinking tags simply answers (effort then has nothing to bound), but
        # a prompt that already opened <think> needs them.
        self._reasoning = spec.reasoning_enabled and THINK in tags and END_THINK in tags
        need = ([THINK, END_THINK] if spec.prompt_opens_think else []) + (
            [TOOL_CALL, END_TOOL_CALL] if spec.tools_allowed else [])
        missing = [t for t in need if t not in tags]
        if missing:
            raise ValueError(f"the vocabulary has no {missing} token(s), needed by this request")
        self._think, self._end_think = tags.get(THINK), tags.get(END_THINK)
        self._call, self._end_call = tags.get(TOOL_CALL), tags.get(END_TOOL_CALL)
        self._ends = vocab.eos_ids
        self._ll_eos = vocab.ll_tokenizer.eos_token

        text, blank = vocab.text_mask, vocab.blank_mask
        call = [self._call] if spec.tools_allowed else []
        self._m_reasoning = text | vocab.mask_of([self._end_think] + call) if self._reasoning else None
        self._m_answer = text | vocab.mask_of(list(self._ends) + call)
        self._m_blank = blank
        self._m_call_open = vocab.mask_of(call)
        self._m_think = vocab.mask_of([self._think]) if self._reasoning else None
        self._m_text = text
        self._m_ends = vocab.mask_of(self._ends)
        # Grammar masks are cut to ordinary tokens: no tag or unusable token gets in through them.
        self._m_text_or_ll_eos = text | vocab.mask_of([self._ll_eos])

        self._budget = spec.budget if self._reasoning else None
        if self._budget is not None:
            self._handoff = vocab.encode(HANDOFF_TEXT)
            if self._end_think not in self._handoff:
                raise ValueError("the tokenizer does not encode </think> as its special token")
            self._short_handoff = self._handoff[self._handoff.index(self._end_think):]
        self._tool_matcher = (vocab.new_matcher(tool_call_grammar(spec.callable_tools()))
                              if spec.tools_allowed else None)
        self._answer_matcher = (vocab.new_matcher(response_format_grammar(spec.response_format))
                                if spec.response_format is not None else None)

        self.state = State.REASONING if spec.prompt_opens_think else State.START
        self._forced: collections.deque[int] = collections.deque()
        self._forcing_handoff = False
        self._blanks = 0
        self._calls: list[_CallScanner] = []
        self._decoder = vocab.stream_decoder()
        self._buf = np.zeros(vocab.n_words, np.int32)
        self._mask_ready = False
        self._last_mask = self._buf
        self.usage = ev.Usage(input_tokens=input_tokens, cached_input_tokens=cached_input_tokens)
        self._counts = collections.Counter()
        self.finish_reason: str | None = None
        self._maybe_force()

    # ----------------------------------------------------------------------------- masks
    def next_mask(self, out: np.ndarray | None = None) -> np.ndarray:
        """Bitmask of the tokens allowed next.

        Args:
            out: where to write it, e.g. this request's row of the batch's int32[B, ceil(V/32)]
                mask (must stay untouched until ``advance``); default: a buffer of the machine's.

        Returns:
            int32[ceil(V/32)]: bit ``t % 32`` of word ``t // 32`` is set iff token ``t`` is
            allowed (``out`` when given). Valid until the next call.
        """
        if self.state is State.DONE:
            raise ValueError("the request is finished; no next token")
        if out is not None and (out.shape != self._buf.shape or out.dtype != np.int32
                                or not out.flags["C_CONTIGUOUS"]):
            raise ValueError(f"out must be a contiguous int32[{self._buf.shape[0]}] array, "
                             f"got {out.dtype}{list(out.shape)}")
        m = self._buf if out is None else out
        plan = self._plan_mask(m)
        if plan is not None:
            self.vocab.fill_mask(plan.matcher, m)
            self._complete_mask(m, plan)
        self._mask_ready = True
        self._last_mask = m
        return m

    def _plan_mask(self, m: np.ndarray) -> _GrammarStep | None:
        """Writes the mask of a free state into ``m``; for a grammar state, says what to do."""
        extra = []
        if self._forced:
            m[:] = 0
            set_bit(m, self._forced[0])
            return None
        if self.state is State.REASONING:
            np.copyto(m, self._m_reasoning)
            return None
        if self.state is State.TOOL_CALL:
            return _GrammarStep(self._tool_matcher, (self._end_call,), ())
        if self.state is State.ANSWER:
            if self._answer_matcher is None:
                np.copyto(m, self._m_answer)
                return None
            return _GrammarStep(self._answer_matcher, self._ends, ())
        if self.state is State.BETWEEN_CALLS:
            np.copyto(m, self._m_ends)
            if self.spec.parallel_tool_calls:
                m |= self._m_call_open
                if self._blanks < MAX_SEPARATOR_BLANKS:
                    m |= self._m_blank
            return None
        # START / AFTER_REASONING: the first token of an answer or a call, as tool_choice allows.
        if self.state is State.START and self._m_think is not None:
            extra.append(self._m_think)
        elif self.state is State.AFTER_REASONING and self._blanks < MAX_SEPARATOR_BLANKS:
            extra.append(self._m_blank)
        if self.spec.call_required and not self._calls:
            np.copyto(m, self._m_call_open)
        elif self._answer_matcher is None:
            np.copyto(m, self._m_text)
            m |= self._m_call_open
        else:
            return _GrammarStep(self._answer_matcher, (), (self._m_call_open, *extra))
        for e in extra:
            m |= e
        return None

    def _complete_mask(self, m: np.ndarray, plan: _GrammarStep) -> None:
        """Turns llguidance's mask in ``m`` into the channel's."""
        m &= self._m_text_or_ll_eos
        # llguidance marks "the grammar may end here" with its eos (= <|im_end|>'s id); the
        # channel decides which token actually ends it.
        if has_bit(m, self._ll_eos):
            clear_bit(m, self._ll_eos)
            for t in plan.end_ids:
                set_bit(m, t)
        for e in plan.extra:
            m |= e
        if not m.any():
            raise RuntimeError(f"grammar in state {self.state.value} allows no token: "
                               f"{plan.matcher.get_error() or 'no continuation'}")

    # ----------------------------------------------------------------------------- tokens
    def advance(self, token: int) -> list[ev.Event]:
        """Takes the sampled token and returns the events it produces.

        Raises:
            ValueError: the token is not allowed (the sampler ignored the mask) or the request
                already finished.
        """
        if self.state is State.DONE:
            raise ValueError("the request is finished; advance() after Finished")
        token = int(token)
        if not 0 <= token < self.vocab.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab.vocab_size})")
        mask = self._last_mask if self._mask_ready else self.next_mask()
        if not has_bit(mask, token):
            raise ValueError(f"token {token} is not allowed in state {self.state.value}")
        self._mask_ready = False
        was_forced = bool(self._forced)
        if was_forced:
            self._forced.popleft()
        out: list[ev.Event] = []
        getattr(self, f"_on_{self.state.value}")(token, out)
        if was_forced and not self._forced:
            # The hand-off wrote the separator already; further blanks would overrun the budget.
            self._blanks = MAX_SEPARATOR_BLANKS
        self._maybe_force()
        return out

    def _count(self, channel: str) -> None:
        self._counts[channel] += 1

    def _on_start(self, token: int, out: list) -> None:
        if token == self._think:
            self._count("reasoning")
            self.state = State.REASONING
        else:
            self._on_after_reasoning(token, out)

    def _on_reasoning(self, token: int, out: list) -> None:
        if token == self._end_think:
            self._count("reasoning")
            self._close_reasoning(out)
            self.state = State.AFTER_REASONING
            self._blanks = 0
        elif token == self._call:
            # A call opened inside <think> ends the reasoning: it is a call, never reasoning text.
            self._close_reasoning(out)
            self._open_call(out)
        else:
            self._count("reasoning")
            self._emit_text(self._decoder.push(token), ev.ReasoningDelta, out)

    def _on_after_reasoning(self, token: int, out: list) -> None:
        if token == self._call:
            self._open_call(out)
        elif self.state is State.AFTER_REASONING and has_bit(self._m_blank, token):
            self._count("reasoning")  # the "\n\n" separator after </think>
            self._blanks += 1
        else:
            self.state = State.ANSWER
            self._decoder = self.vocab.stream_decoder()
            self._on_answer(token, out)

    def _on_answer(self, token: int, out: list) -> None:
        if token in self._ends:
            self._count("answer")
            self._emit_text(self._decoder.flush(), ev.AnswerDelta, out)
            self._finish("stop", out)
        elif token == self._call:
            self._emit_text(self._decoder.flush(), ev.AnswerDelta, out)
            self._open_call(out)
        else:
            self._count("answer")
            if self._answer_matcher is not None:
                self._consume(self._answer_matcher, token)
            self._emit_text(self._decoder.push(token), ev.AnswerDelta, out)

    def _on_tool_call(self, token: int, out: list) -> None:
        self._count("tool_call")
        scanner = self._calls[-1]
        if token == self._end_call:
            events, in_args = scanner.feed(self._decoder.flush())
            out += events
            out.append(ev.ToolCallDone(scanner.index, scanner.name or "", "".join(scanner.arguments)))
            self.state = State.BETWEEN_CALLS
            self._blanks = 0
            return
        self._consume(self._tool_matcher, token)
        events, in_args = scanner.feed(self._decoder.push(token))
        out += events
        if in_args:
            self._count("tool_argument")

    def _on_between_calls(self, token: int, out: list) -> None:
        if token == self._call:
            self._open_call(out)
        elif token in self._ends:
            self._count("tool_call")
            self._finish("tool_calls", out)
        else:
            self._count("tool_call")
            self._blanks += 1

    def _open_call(self, out: list) -> None:
        self._count("tool_call")
        self._tool_matcher.reset()
        self._calls.append(_CallScanner(len(self._calls)))
        self._decoder = self.vocab.stream_decoder()
        self.state = State.TOOL_CALL

    def _close_reasoning(self, out: list) -> None:
        self._emit_text(self._decoder.flush(), ev.ReasoningDelta, out)
        out.append(ev.ReasoningDone(forced=self._forcing_handoff))
        self._forcing_handoff = False

    def _consume(self, matcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise ValueError(f"token {token} rejected by the grammar: {matcher.get_error()}")

    @staticmethod
    def _emit_text(text: str, kind, out: list) -> None:
        if text:
            out.append(kind(text))

    def set_budget(self, budget: int) -> None:
        """Replaces the reasoning budget (``effort="auto"``: the predictor's, once the prompt's
        hidden state is known). No effect when reasoning is disabled or the hand-off has begun;
        a budget already spent closes the reasoning at the next token."""
        _positive_int("budget", budget)
        if self._budget is None or self._forcing_handoff or self.state is State.DONE:
            return
        self._budget = budget
        self._maybe_force()

    def _maybe_force(self) -> None:
        """Starts the hand-off when the reasoning budget has just room enough for it."""
        if self._budget is None or self.state is not State.REASONING or self._forced:
            return
        seq = self._handoff_at(self._counts["reasoning"])
        if seq is None:
            return
        self._forced.extend(seq)
        self._forcing_handoff = True

    def _handoff_at(self, used: int) -> list[int] | None:
        """The hand-off to force after ``used`` reasoning tokens, or None (budget not reached)."""
        if used + len(self._handoff) == self._budget:
            return self._handoff
        if used + len(self._handoff) > self._budget and used + len(self._short_handoff) >= self._budget:
            return self._short_handoff  # the sentence does not fit: close right away
        return None

    # ----------------------------------------------------------------------------- speculation
    @property
    def mask_is_fixed(self) -> bool:
        """Whether the next mask is a precomputed one that ordinary text tokens leave unchanged:
        reasoning with no hand-off pending, or an answer without ``response_format``. Speculative
        decoding verifies drafts only here, all under this one mask (grammar and forced states
        decode one token at a time, so their masks hold exactly as without speculation)."""
        return self.state is not State.DONE and not self._forced and (
            self.state is State.REASONING
            or (self.state is State.ANSWER and self._answer_matcher is None))

    def fixed_mask_run(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` (each drawn under the current mask, in order) may be taken now.

        The first always; each later one only while the tokens before it keep the mask what it
        is: no channel tag, no end of turn, no budget hand-off starting. A verified draft past
        that point was checked against a mask that no longer applies, so it is dropped.
        """
        if not tokens:
            return 0
        if not self.mask_is_fixed:
            return 1
        used = self._counts["reasoning"]
        for i, token in enumerate(tokens[:-1]):
            if self.state is State.REASONING:
                if token in (self._end_think, self._call):
                    return i + 1
                used += 1
                if self._budget is not None and self._handoff_at(used) is not None:
                    return i + 1
            elif token in self._ends or token == self._call:
                return i + 1
        return len(tokens)

    # ----------------------------------------------------------------------------- ending
    def finish(self, reason: str) -> list[ev.Event]:
        """Ends the request from outside (``length``, ``cancelled``, ...): flushes and reports.

        An unfinished tool call gets no ``ToolCallDone``.
        """
        if self.state is State.DONE:
            raise ValueError("the request is already finished")
        out: list[ev.Event] = []
        kind = {State.REASONING: ev.ReasoningDelta, State.ANSWER: ev.AnswerDelta}.get(self.state)
        if kind is not None:
            self._emit_text(self._decoder.flush(), kind, out)
        elif self.state is State.TOOL_CALL:
            out += self._calls[-1].feed(self._decoder.flush())[0]
        self._finish(reason, out)
        return out

    def _finish(self, reason: str, out: list) -> None:
        c = self._counts
        self.usage = dataclasses.replace(
            self.usage, reasoning_tokens=c["reasoning"], answer_tokens=c["answer"],
            tool_call_tokens=c["tool_call"], tool_argument_tokens=c["tool_argument"])
        self.state = State.DONE
        self.finish_reason = reason
        out.append(ev.Finished(reason, self.usage))

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def current_usage(self) -> ev.Usage:
        """Counts so far (``usage`` is final only once done)."""
        c = self._counts
        return dataclasses.replace(
            self.usage, reasoning_tokens=c["reasoning"], answer_tokens=c["answer"],
            tool_call_tokens=c["tool_call"], tool_argument_tokens=c["tool_argument"])

    def record_prompt(self, input_tokens: int, cached_input_tokens: int, image_tokens: int = 0) -> None:
        """Sets the prompt counts once the scheduler knows the prefix-cache hit."""
        self.usage = dataclasses.replace(self.usage, input_tokens=input_tokens,
                                         cached_input_tokens=cached_input_tokens,
                                         image_tokens=image_tokens)


_EXECUTOR = None


def fill_masks(machines: Sequence[ChannelMachine | None], out: np.ndarray) -> np.ndarray:
    """Next-token masks of a whole batch, grammar rows computed in parallel by llguidance.

    Args:
        machines: one per batch row; None for rows without a request (left all-allowed).
        out: int32[B, ceil(V/32)], C-contiguous; row ``i`` gets ``machines[i]``'s mask.

    Returns:
        ``out``, each row valid for its machine's next ``advance``.
    """
    global _EXECUTOR
    if out.ndim != 2 or out.shape[0] != len(machines) or out.dtype != np.int32 \
            or not out.flags["C_CONTIGUOUS"]:
        raise ValueError(f"out must be a contiguous int32[{len(machines)}, W] array, got "
                         f"{out.dtype}{list(out.shape)}")
    plans = []
    for i, mach in enumerate(machines):
        if mach is None:
            out[i] = -1
            continue
        if mach.state is State.DONE:
            raise ValueError(f"row {i}: the request is finished; no next token")
        if out.shape[1] != mach._buf.shape[0]:
            raise ValueError(f"out has {out.shape[1]} words per row, the vocabulary needs "
                             f"{mach._buf.shape[0]}")
        plan = mach._plan_mask(out[i])
        if plan is not None:
            plans.append((i, mach, plan))
    if plans:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        plans[0][1].vocab.fill_masks(_EXECUTOR, [(p.matcher, i) for i, _, p in plans], out)
    for i, mach, plan in plans:
        mach._complete_mask(out[i], plan)
    for i, mach in enumerate(machines):
        if mach is not None:
            mach._mask_ready, mach._last_mask = True, out[i]
    return out
