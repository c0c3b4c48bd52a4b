"""The bundled default model, checkpoints/kestrel-nano: small, loadable, and trained."""

import pathlib

import numpy as np
import pytest

from model.checkpoint import load_checkpoint, read_config, read_meta
from model.tokenizer_backends import CHAT_SPECIAL_TOKENS
from train.config import load_config
from train.eval import run_eval

ROOT = pathlib.Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "kestrel-nano"
CONFIG = ROOT / "configs" / "nano.py"

pytestmark = pytest.mark.skipif(not (CKPT / "config.json").is_file(),
                                reason="checkpoints/kestrel-nano is not built in this tree")


def test_bundled_checkpoint_is_small_and_matches_its_config():
    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size < 50 * 2 ** 20
    cfg = read_config(CKPT)
    trained = load_config(CONFIG).model
    assert cfg.replace(dtype="float32", param_dtype="float32") == \
        trained.replace(dtype="float32", param_dtype="float32")
    assert read_meta(CKPT)["source"]["kind"] == "kestrel-train"


def test_bundled_tokenizer_has_the_chat_format():
    model, tok = load_checkpoint(CKPT)
    assert tok is not None and tok.vocab_size <= model.config.vocab_size
    for t in CHAT_SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1, t
    prompt = tok.render_chat([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("suite, opening", [("stem", "<think>\nTask:"), ("tools", "<think>\nThe user asks")])
def test_bundled_model_opens_with_the_trained_reasoning_scheme(suite, opening):
    # What training taught it so far: each suite's regular reasoning opening, on a held-out
    # problem prompted exactly as `kestrel eval` prompts it (a random model writes noise here).
    from model.generate import GenerationConfig, Generator
    from train.eval import heldout_examples, start

    model, tok = load_checkpoint(CKPT)
    example, _ = heldout_examples(suite, 1, seed=7)[0]
    conv = start(example, "tools", tok)
    gen = Generator(model).generate([conv.context], GenerationConfig(max_new_tokens=8))[0]
    assert tok.decode(gen.token_ids).startswith(opening)
    assert np.all(np.isfinite(gen.logprobs))
