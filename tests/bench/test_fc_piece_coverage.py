"""bench/fc_piece_coverage.py: a call's tokens are the ones between its tags, and the shares it
reports are shares; more training examples never leave more held-out tokens rare."""

import json

from bench.fc_piece_coverage import call_tokens, encode, measure
from model.tokenizer import Tokenizer
from train.synthetic import generate

TOKENIZER = "checkpoints/kestrel-nano"


def test_call_tokens_are_each_calls_json():
    tok = Tokenizer.load(TOKENIZER)
    ex = generate("fc_parallel", level=2, seed=4, split="heldout")
    calls = call_tokens(tok, encode(tok, ex))
    assert len(calls) == len(ex.meta["calls"]) >= 2
    for tokens, want in zip(calls, ex.meta["calls"]):
        assert json.loads(tok.decode(tokens))["name"] == want["name"]


def test_shares_are_shares_and_fall_with_more_training_examples():
    few, more = (measure("configs/nano.py", n, heldout=6, rare=3) for n in (20, 200))
    for result in (few, more):
        assert 0 <= result["rare_target_share"] <= 1 and 0 <= result["calls_without_rare_tokens"] <= 1
        assert result["heldout_calls"] >= 6
    assert more["rare_target_share"] < few["rare_target_share"]


def test_piece_dropout_in_training_text_leaves_fewer_held_out_tokens_rare():
    plain, dropped = (measure("configs/nano.py", 600, heldout=12, rare=3, piece_dropout=p) for p in (0.0, 0.2))
    assert dropped["piece_dropout"] == 0.2
    assert dropped["rare_target_share"] < plain["rare_target_share"]
