"""Speculative decoding through the API: draft counts in OpenAI usage (Chat Completions and
Responses), the per-request ``speculative: false`` switch, and the serve flags."""

from __future__ import annotations

import argparse

import openai
import pytest

from conftest import MODEL_ID, make_server
from kestrel.errors import KestrelError
from serve.chat_cli import add_serve_arguments, speculative_config
from serve.engine import Engine
from serve.speculative import SpeculativeConfig
from tiny_model import build_model


@pytest.fixture(scope="module")
def spec_engine(tokenizer):
    model = build_model(tokenizer)
    # The draft is the target itself: greedy drafts are always the argmax, so they are accepted
    # wherever the channel mask stays fixed (reasoning, the answer).
    eng = Engine(model, tokenizer, num_pages=128, page_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                 prefill_chunk_size=32,
                 speculative=SpeculativeConfig("draft", 3, draft_model=model, draft_tokenizer=tokenizer))
    eng.runner.min_table_pages = 64
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def client(spec_engine):
    with make_server(spec_engine) as s:
        with openai.OpenAI(base_url=s.http_base + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            yield c


def test_usage_reports_accepted_and_rejected_drafts(client, spec_engine):
    before = spec_engine.stats()
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                       reasoning_effort="high", temperature=0, max_tokens=40)
    d = r.usage.completion_tokens_details
    assert d.accepted_prediction_tokens > 0
    after = spec_engine.stats()
    assert d.accepted_prediction_tokens == after.num_accepted_tokens - before.num_accepted_tokens
    assert d.accepted_prediction_tokens + d.rejected_prediction_tokens == \
        after.num_draft_tokens - before.num_draft_tokens
    assert d.accepted_prediction_tokens <= r.usage.completion_tokens

    resp = client.responses.create(model=MODEL_ID, input="What is 2 + 2?", reasoning={"effort": "high"},
                                   temperature=0, max_output_tokens=40)
    details = resp.usage.output_tokens_details.model_extra
    assert details["accepted_prediction_tokens"] > 0 and "rejected_prediction_tokens" in details


def test_a_request_can_switch_speculation_off(client, spec_engine):
    before = spec_engine.stats().num_draft_tokens
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                       reasoning_effort="high", temperature=0, max_tokens=40,
                                       extra_body={"speculative": False})
    assert r.usage.completion_tokens > 0
    assert r.usage.completion_tokens_details.accepted_prediction_tokens == 0
    assert spec_engine.stats().num_draft_tokens == before
    with pytest.raises(openai.BadRequestError, match="speculative"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"speculative": "no"})


def _args(*argv):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(["ckpt", *argv])


def test_serve_flags_build_the_speculative_config(tmp_path):
    assert speculative_config(_args()) is None
    cfg = speculative_config(_args("--speculative", "ngram", "--num-speculative-tokens", "5",
                                   "--prompt-lookup-max", "3", "--prompt-lookup-min", "1"))
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == ("ngram", 5, 3, 1)
    for argv, match in ((("--speculative", "draft"), "needs --draft-model"),
                        (("--draft-model", str(tmp_path)), "needs --speculative draft"),
                        (("--speculative", "draft", "--draft-model", str(tmp_path / "nope")), "does not exist"),
                        (("--speculative", "ngram", "--num-speculative-tokens", "0"), "num_speculative_tokens")):
        with pytest.raises(KestrelError, match=match):
            speculative_config(_args(*argv))
