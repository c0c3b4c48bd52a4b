"""Tiny random Hugging Face models written offline for the conversion tests."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx


def tiny_hf_model(family="llama", seed=0, **overrides):
    """A random tiny HF causal LM (2 layers) with weights large enough for logits to vary."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64)
    config_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
                  "gemma3": transformers.Gemma3TextConfig, "qwen2": transformers.Qwen2Config}[family]
    config = config_cls(**{**common, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    return randomize(model)


def randomize(model):
    """Weights far from their initial values (norm scales and biases moved too), so parity tests
    exercise every parameter; returns the model in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


@pytest.fixture
def hf_llama(tmp_path):
    """(folder, model): a random tiny untied Llama saved with save_pretrained."""
    model = tiny_hf_model("llama", tie_word_embeddings=False)
    folder = tmp_path / "hf_llama"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def make_hf_model():
    """The ``tiny_hf_model`` builder, for tests that need another family or config."""
    return tiny_hf_model


@pytest.fixture
def logits_of():
    """The ``hf_logits`` helper."""
    return hf_logits


def _kestrel_logits(model, tokens: np.ndarray) -> np.ndarray:
    # Jitted: eager op-by-op dispatch compiles every op separately and is far slower on CPU.
    return np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(tokens)))


@pytest.fixture
def kestrel_logits():
    """Logits [B, T, V] of a Kestrel model on tokens, through a jitted forward."""
    return _kestrel_logits
