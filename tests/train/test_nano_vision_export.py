"""configs/nano_vision_tiny.py trains on text and rendered problems, exports a checkpoint whose
tower loads, and serves an image question through the engine and ``kestrel eval --suite vision``."""

import asyncio
import io
import json
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from kestrel import cli, demo

from configs.nano_vision_tiny import config as tiny_vision_config
from model.checkpoint import load_checkpoint
from serve.api.convert import Policy
from serve.api.server import KestrelServer
from serve.engine import EngineRequest
from serve.request import SamplingParams
from train import eval as ev
from train.export import export_trained
from train.loop import run
from train.nano_tokenizer import train_nano_tokenizer
from train.synthetic import SUITES, generate

CONFIG = "configs/nano_vision_tiny.py"
STEPS = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano_vision_tiny")
    train_nano_tokenizer(root / "tok", vocab_size=1800, n_examples=80, seed=3)
    overrides = [f"data.tokenizer={root / 'tok'}", f"steps={STEPS}", f"checkpoint.every_steps={STEPS}"]
    result = run(CONFIG, root / "run", overrides, devices=jax.devices()[:1], report=lambda _: None)
    out = export_trained(root / "run", root / "ckpt", config=CONFIG, overrides=overrides)
    return out, result


def test_the_exported_checkpoint_holds_the_trained_tower(exported):
    out, result = exported
    assert result.last_step == STEPS and all(np.isfinite(v) for v in result.losses.values())
    model, tok = load_checkpoint(out)
    assert model.config.vision == tiny_vision_config().model.vision
    assert (tok.token_to_id("<image>"), tok.token_to_id("<|image_pad|>")) == (
        model.config.vision.image_start_id, model.config.vision.image_token_id)
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))["vision"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, result.params["vision"])


def test_the_engine_answers_a_question_about_a_rendered_problem(exported):
    out, _ = exported
    model, tok = load_checkpoint(out)
    problem = generate("image_chart", level=1, seed=7)
    engine = ev.eval_engine(model, tok, max_num_seqs=2)
    message = {"role": "user", "content": [{"type": "image", "image": problem.images[0]},
                                           {"type": "text", "text": "What does the chart show?"}]}
    h = engine.submit(EngineRequest(messages=[message], channels=False,
                                    params=SamplingParams(max_tokens=4, temperature=0.0)))
    engine.run_until_idle()
    assert h.finish_reason is not None and len(h.output_token_ids) >= 1
    (span,) = h.request.mm_spans
    assert span.length == model.config.vision.mm_tokens_per_image
    assert engine.runner.images.num_encoded == 1


@pytest.mark.parametrize("suite", ["vision", "reading"])
def test_kestrel_eval_picture_suites_run_constrained(exported, monkeypatch, suite):
    out, _ = exported
    # `kestrel eval CKPT --suite vision --constrained --n 2`, in process; run_eval prints to its
    # `out`, whose default (sys.stdout) was bound at import: point it at a buffer.
    buf = io.StringIO()
    monkeypatch.setattr(ev.run_eval, "__kwdefaults__", {**ev.run_eval.__kwdefaults__, "out": buf})
    assert cli.main(["eval", str(out), "--suite", suite, "--constrained", "--n", "2",
                     "--max-new-tokens", "8", "--batch-size", "2", "--json"]) in (0, None)
    result = json.loads(buf.getvalue())
    assert result["n"] == 2 and result["suite"] == suite
    assert {row["task"] for row in result["rows"]} <= set(SUITES[suite])
    overall = [res["overall"] for res in result["results"].values()]
    assert overall and all(agg["n"] == 2 for agg in overall)


def test_image_use_scores_the_read_tokens_with_own_swapped_and_blank_pictures(exported):
    from bench.image_use import PICTURES, measure, read_line_mask
    from train.packing import tokenize_segments
    from train.synthetic import render_kestrel

    out, _ = exported
    _, tok = load_checkpoint(out)
    ex = generate("image_chart", level=2, seed=3, split="heldout")
    enc = tokenize_segments(tok, render_kestrel(ex))
    scored = [int(t) for t, keep in zip(enc.ids, read_line_mask(tok, enc.ids, enc.trainable)) if keep]
    assert tok.decode(scored).strip() == ex.messages[2]["reasoning_content"].splitlines()[0]
    result = measure(str(out), 5)
    assert result["scored_tokens"] > 0 and set(result["pictures"]) == set(PICTURES)
    for row in result["pictures"].values():
        assert row["nll_per_token"] > 0 and 0 <= row["token_accuracy"] <= 1
    assert set(result["by_task"]) == set(SUITES["vision"]) | set(SUITES["reading"])
    assert result["swapped_minus_own_nll"] == pytest.approx(
        result["pictures"]["swapped"]["nll_per_token"] - result["pictures"]["own"]["nll_per_token"])
    soft = result["soft_tokens"]
    assert -1 <= soft["mean_pairwise_cosine"] <= 1 and soft["mean_norm"] > 0 and soft["text_embedding_mean_norm"] > 0


def test_the_demo_asks_about_a_rendered_problem_when_the_model_takes_images(exported, capfd):
    out, _ = exported
    model, tok = load_checkpoint(out)
    engine = ev.eval_engine(model, tok, max_num_seqs=2)
    engine.start()
    server = KestrelServer(engine, model_id="nano-vision-tiny", max_output_tokens=6,
                           policy=Policy(effort_budgets={"low": 2, "medium": 2, "high": 2}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(host="127.0.0.1", port=0, http_port=None),
                                         loop).result(60)
        demo.image_step(f"127.0.0.1:{server.port}", str(out))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        engine.stop()
    shown = capfd.readouterr().out
    # The command line the demo prints names the temporary PNG; usage counts the image's tokens.
    assert "--image" in shown and f"{demo.IMAGE_TASK}.png" in shown and "skipped" not in shown
    assert f"{model.config.vision.mm_tokens_per_image} image" in shown


def test_the_demo_skips_the_image_question_for_a_text_model(capfd):
    demo.image_step("127.0.0.1:1", "checkpoints/kestrel-nano")  # no server needed: nothing is sent
    shown = capfd.readouterr().out.strip()
    assert shown.count("\n") == 0 and "skipped" in shown and "no vision tower" in shown
