"""Request and SamplingParams: validation with clear errors, token bookkeeping."""

from __future__ import annotations

import math

import pytest

from serve.request import FinishReason, MultiModalSpan, Request, RequestStatus, SamplingParams


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -3}, "max_tokens must be >= 1"),
        ({"max_tokens": 2.0}, "max_tokens must be an int"),
        ({"max_tokens": True}, "max_tokens must be an int"),
        ({"temperature": -0.1}, r"temperature must be in \[0.0, inf\]"),
        ({"temperature": math.nan}, "temperature must be a number"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0.0, 1.0\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0.0, 1.0\]"),
        ({"min_p": -0.5}, r"min_p must be in \[0.0, 1.0\]"),
        ({"seed": "7"}, "seed must be an int"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0.0, inf\]"),
        ({"frequency_penalty": 2.5}, r"frequency_penalty must be in \[-2.0, 2.0\]"),
        ({"presence_penalty": -3}, r"presence_penalty must be in \[-2.0, 2.0\]"),
        ({"stop_token_ids": [1, -2]}, r"stop_token_ids\[\] must be >= 0"),
        ({"stop_token_ids": "abc"}, "stop_token_ids must be a sequence of ints"),
        ({"logprobs": 1}, "logprobs must be a bool"),
        ({"top_logprobs": 3}, "top_logprobs > 0 needs logprobs=True"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs must be <= 20"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_and_defaults():
    p = SamplingParams(temperature=0, stop_token_ids=[2, 3], top_logprobs=5, logprobs=True)
    assert p.stop_token_ids == (2, 3) and p.greedy and isinstance(p.temperature, float)
    assert not SamplingParams().greedy
    with pytest.raises(AttributeError):
        p.max_tokens = 5  # frozen: shared between requests safely


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"request_id": "", "prompt_token_ids": [1]}, "request_id must be a non-empty str"),
        ({"request_id": "r", "prompt_token_ids": []}, "prompt_token_ids is empty"),
        ({"request_id": "r", "prompt_token_ids": "hello"}, "prompt_token_ids must be a sequence of ints"),
        ({"request_id": "r", "prompt_token_ids": [1, -1]}, "prompt token ids must be ints >= 0"),
        ({"request_id": "r", "prompt_token_ids": [1], "params": {"max_tokens": 3}}, "params must be SamplingParams"),
        (
            {"request_id": "r", "prompt_token_ids": [1, 2], "mm_spans": [MultiModalSpan(1, 2, "h")]},
            r"image span \[1, 3\) runs past the prompt of 2 tokens",
        ),
    ],
)
def test_request_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Request(**kwargs)


def test_multimodal_span_validation():
    with pytest.raises(ValueError, match="length must be >= 1"):
        MultiModalSpan(0, 0, "h")
    with pytest.raises(ValueError, match="content_hash must be a non-empty str"):
        MultiModalSpan(0, 1, "")


def test_token_bookkeeping():
    r = Request("r", [5, 6, 7])
    assert r.status == RequestStatus.WAITING and r.finish_reason is None and not r.is_finished
    r.output_token_ids += [8, 9]
    assert r.num_tokens == 5 and r.num_prompt_tokens == 3 and r.num_output_tokens == 2
    assert r.all_token_ids == (5, 6, 7, 8, 9)
    for lo in range(6):
        for hi in range(lo, 6):
            assert r.token_slice(lo, hi) == list(r.all_token_ids[lo:hi])
    assert FinishReason.DEADLINE == "deadline" and str(FinishReason.CANCELLED) == "cancelled"
