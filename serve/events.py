"""Typed events a request's channel machine emits, in order, as tokens are sampled.

One stream per request: zero or more ``ReasoningDelta`` then one ``ReasoningDone`` (when the model
thought), then ``AnswerDelta``s and/or tool calls (``ToolCallName``, ``ToolCallArgumentsDelta``...,
``ToolCallDone`` per call, ``index`` counting calls from 0), and always a final ``Finished``.
Text deltas are whole UTF-8 characters; their concatenation per channel is the channel's text.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of one request, per channel.

    Every generated token belongs to exactly one channel, so
    ``output_tokens == reasoning_tokens + answer_tokens + tool_call_tokens``.

    Attributes:
        input_tokens: prompt tokens.
        cached_input_tokens: prompt tokens served from the prefix cache (part of input_tokens).
        reasoning_tokens: ``<think>`` .. ``</think>`` and the blank separator after it, the
            budget hand-off included.
        answer_tokens: answer text and the end-of-turn token when the turn ends in an answer.
        tool_call_tokens: ``<tool_call>`` .. ``</tool_call>`` blocks, blanks between them and the
            end-of-turn token after them.
        tool_argument_tokens: the part of tool_call_tokens whose text lies in ``arguments``.
        image_tokens: the part of input_tokens that are image placeholders (soft tokens).
        accepted_prediction_tokens: speculative decoding: draft tokens the target accepted
            (part of the output tokens above; OpenAI's
            ``completion_tokens_details.accepted_prediction_tokens``).
        rejected_prediction_tokens: draft tokens verified and rejected (computed, not output).
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    tool_call_tokens: int = 0
    tool_argument_tokens: int = 0
    image_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return self.reasoning_tokens + self.answer_tokens + self.tool_call_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ReasoningDone:
    """Reasoning closed; ``forced`` when the budget ran out and the machine wrote the hand-off."""

    forced: bool


@dataclasses.dataclass(frozen=True)
class AnswerDelta:
    """Answer text; ``logprobs`` (when the request asked for them) holds one sample record per
    answer token whose text this delta completes (``serve.runner.SampleOutput``: token id,
    log-probability, top alternatives)."""

    text: str
    logprobs: tuple = ()


@dataclasses.dataclass(frozen=True)
class ToolCallName:
    """The called function's name, known in full (the grammar allows only offered names)."""

    index: int
    name: str


@dataclasses.dataclass(frozen=True)
class ToolCallArgumentsDelta:
    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDone:
    """A call closed by ``</tool_call>``; ``arguments`` is its JSON text (valid for its schema)."""

    index: int
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request.

    Attributes:
        reason: ``stop`` (end of turn after an answer), ``tool_calls`` (end of turn after calls),
            or what the engine passed to ``ChannelMachine.finish`` (``length``, ``cancelled``...).
        usage: final token counts.
    """

    reason: str
    usage: Usage


Event = ReasoningDelta | ReasoningDone | AnswerDelta | ToolCallName | ToolCallArgumentsDelta | ToolCallDone | Finished
