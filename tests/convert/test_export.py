"""export_checkpoint: convert -> export -> transformers loads it with equal logits."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from kestrel.errors import KestrelError
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.convert import convert_checkpoint, export_checkpoint
from model.checkpoint import abstract_params, model_from_params

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 20))
FAMILIES = {
    "llama": dict(tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 10_000.0}),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10_000.0,
                                   "original_max_position_embeddings": 32}),
    "gemma3": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                   query_pre_attn_scalar=12, final_logit_softcapping=10.0,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 100_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def init_model(cfg, seed=0):
    """A Transformer with random weights drawn in numpy (fast; model.init_model is eager)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype),
                          abstract_params(cfg))
    return model_from_params(cfg, params)


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_through_transformers(family, tmp_path, make_hf_model, logits_of):
    hf_model = make_hf_model(family, **FAMILIES[family])
    hf_model.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == hf_model.config.architectures
    reloaded = load_hf(out)
    np.testing.assert_allclose(logits_of(reloaded, TOKENS), logits_of(hf_model, TOKENS), atol=1e-4, rtol=0)


def tiny_tokenizer(folder):
    """A tiny BPE trained offline, saved the way transformers saves tokenizers."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40])
    tok.train_from_iterator(["hello world", "the kestrel hovers", "wind and wings"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def test_tokenizer_travels_through_convert_and_export(tmp_path, make_hf_model):
    hf_model = make_hf_model("llama", tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path / "hf")
    fast = tiny_tokenizer(tmp_path / "hf")
    ckpt = convert_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    _, tokenizer = load_checkpoint(ckpt)
    text = "hello kestrel wings"
    assert tokenizer is not None and tokenizer.encode(text) == fast.encode(text)
    assert tokenizer.eos_id == fast.eos_token_id
    out = export_checkpoint(ckpt, tmp_path / "export")
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.encode(text) == fast.encode(text)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (fast.bos_token_id, fast.eos_token_id)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert fast.eos_token_id in np.atleast_1d(generation.eos_token_id)


def test_kestrel_config_exports_as_the_family_that_fits(tmp_path, logits_of, kestrel_logits):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, qk_norm=True, tie_embeddings=True)
    model = init_model(cfg, seed=3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", source="init")
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    np.testing.assert_allclose(logits_of(load_hf(out), TOKENS), kestrel_logits(model, TOKENS),
                               atol=1e-4, rtol=0)


def test_export_errors(tmp_path):
    with pytest.raises(KestrelError, match="not a Kestrel checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    cfg = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=8, intermediate_size=8, attn_logit_softcap=30.0)
    ckpt = save_checkpoint(init_model(cfg), tmp_path / "ckpt")
    with pytest.raises(KestrelError, match="attn_logit_softcap"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ok = save_checkpoint(init_model(cfg.replace(attn_logit_softcap=None)), tmp_path / "ok")
    (tmp_path / "taken").mkdir()
    with pytest.raises(KestrelError, match="already exists"):
        export_checkpoint(ok, tmp_path / "taken")
