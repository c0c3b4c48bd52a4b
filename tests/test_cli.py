"""The `kestrel` command as users run it: bad input is one `error:` line, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from model import ModelConfig, init_model
from model.checkpoint import save_checkpoint

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}


def kestrel(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "kestrel", *map(str, argv)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, intermediate_size=32, max_position_embeddings=16)
    out = tmp_path_factory.mktemp("cli") / "tiny"
    save_checkpoint(init_model(cfg), out)
    return out


def test_generate_and_score_print_json(tiny_ckpt):
    result = kestrel("generate", tiny_ckpt, "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 4 and len(out["logprobs"]) == 4
    result = kestrel("score", tiny_ckpt, "--ids", "1,2,3,4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 3 and all(lp <= 0 for lp in out["logprobs"])


def test_prompt_longer_than_context_is_refused(tiny_ckpt):
    ids = ",".join(["1"] * 20)
    assert_clean_error(kestrel("generate", tiny_ckpt, "--prompt-ids", ids),
                       "20 tokens", "context of 16")


def test_text_prompt_without_tokenizer_is_refused(tiny_ckpt):
    assert_clean_error(kestrel("generate", tiny_ckpt, "--prompt", "hi"), "no tokenizer")


def test_convert_refuses_missing_source_and_existing_output(tmp_path, tiny_ckpt):
    assert_clean_error(kestrel("convert", tmp_path / "nowhere", "--out", tmp_path / "x"), "nowhere")
    assert not (tmp_path / "x").exists()
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"],
                                                 "model_type": "mamba"}))
    assert_clean_error(kestrel("convert", src, "--out", tmp_path / "y"), "Llama")
    assert not (tmp_path / "y").exists()
    assert_clean_error(kestrel("export", tiny_ckpt, "--out", tiny_ckpt), "exists")


def test_bad_ids_are_named(tiny_ckpt):
    assert_clean_error(kestrel("score", tiny_ckpt, "--ids", "1,x,3"), "--ids")
    assert_clean_error(kestrel("score", tiny_ckpt, "--ids", "1,2,99"), "99")
