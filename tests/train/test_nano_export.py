"""configs/nano_tiny.py trains on the synthetic pipeline and exports a checkpoint that serves."""

import jax
import numpy as np
import pytest
from flax import nnx

from kestrel.errors import KestrelError
from model.checkpoint import load_checkpoint, read_meta
from model.generate import GenerationConfig, Generator
from train.config import load_config
from train.export import export_trained, latest_step, main
from train.loop import run
from train.nano_tokenizer import train_nano_tokenizer

CONFIG = "configs/nano_tiny.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano_tiny")
    tok = train_nano_tokenizer(root / "tok", vocab_size=1800, n_examples=80, seed=3)
    overrides = [f"data.tokenizer={root / 'tok'}"]
    # One device: the tiny batch of 2 rows is not meant to split over 8 simulated devices.
    result = run(CONFIG, root / "run", overrides, devices=jax.devices()[:1], report=lambda _: None)
    return root, tok, overrides, result


def test_tiny_twin_trains_on_synthetic_data(trained):
    _, _, _, result = trained
    cfg = load_config(CONFIG)
    assert result.last_step == cfg.steps and set(result.losses) == set(range(1, cfg.steps + 1))
    # Cross-entropy of a near-uniform start over the embedding's vocabulary, then falling.
    assert all(np.isfinite(v) for v in result.losses.values())
    assert abs(result.losses[1] - np.log(cfg.model.vocab_size)) < 1.0
    assert result.losses[cfg.steps] < result.losses[1]


def test_export_round_trips_and_generates(trained):
    root, tok, overrides, result = trained
    assert latest_step(root / "run") == load_config(CONFIG).steps
    out = export_trained(root / "run", root / "ckpt", config=CONFIG, overrides=overrides)
    model, loaded_tok = load_checkpoint(out)
    assert loaded_tok is not None and loaded_tok.vocab_size == tok.vocab_size
    assert read_meta(out)["source"]["step"] == result.last_step
    exported = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 exported, result.params)
    prompt = loaded_tok.encode(loaded_tok.render_chat([{"role": "user", "content": "What is 2 + 3?"}]))
    gen = Generator(model).generate([prompt], GenerationConfig(max_new_tokens=6))[0]
    assert len(gen.token_ids) == 6 and all(0 <= t < model.config.vocab_size for t in gen.token_ids)
    # The cached decode of the exported model agrees with its full forward pass.
    full = Generator(model).score(prompt + gen.token_ids)
    np.testing.assert_allclose(full.logprobs[len(prompt) - 1:], gen.logprobs, atol=2e-3)


def test_export_refuses_bad_input(trained, tmp_path):
    root, _, overrides, _ = trained
    with pytest.raises(KestrelError, match="checkpoints"):
        export_trained(tmp_path, tmp_path / "x", config=CONFIG, overrides=overrides)
    export_trained(root / "run", tmp_path / "ckpt", config=CONFIG, overrides=overrides)
    with pytest.raises(KestrelError):  # exists, no force
        export_trained(root / "run", tmp_path / "ckpt", config=CONFIG, overrides=overrides)
    with pytest.raises(KestrelError, match="tokenizer"):
        export_trained(root / "run", tmp_path / "c2", config=CONFIG)  # the tiny twin names none
    assert main([str(root / "run"), str(tmp_path / "ckpt"), "--config", CONFIG, "--force",
                 "--dtype", "bfloat16", *sum((["--set", o] for o in overrides), [])]) == 0
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.config.param_dtype == "bfloat16"


def test_export_serves_the_template_the_synthetic_data_was_rendered_with(trained, tmp_path):
    """A tokenizer folder saved with an older chat template (a bundled checkpoint's, say) still
    exports with Kestrel's current one: the synthetic source rendered every example that way."""
    from model.chat_template import KESTREL_TEMPLATE
    from model.tokenizer import Tokenizer

    root, tok, _, _ = trained
    old = tmp_path / "old_tok"
    tok.with_chat_template("{{ messages[0].content }}").save(old)
    assert Tokenizer.load(old).chat_template.source != KESTREL_TEMPLATE
    out = export_trained(root / "run", tmp_path / "ckpt", config=CONFIG, overrides=[f"data.tokenizer={old}"])
    _, loaded = load_checkpoint(out)
    assert loaded.chat_template.source == KESTREL_TEMPLATE and loaded.vocab_size == tok.vocab_size
