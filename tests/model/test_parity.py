"""Converted checkpoints match transformers, family by family, on random tiny configs.

Each case builds a random tiny HF model offline, saves it with ``save_pretrained``, converts it
with ``convert_checkpoint``, loads it with ``load_checkpoint`` and compares log-probabilities
over a 32-token sequence: through the full forward pass and through cached one-token decoding.
Weights are re-drawn larger than HF's init (and norms away from their identity values) so that
logits vary and every parameter, RoPE detail and mask actually shows in the output.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from model import KVCache
from model.checkpoint import load_checkpoint
from model.convert import convert_checkpoint

SEQ = 32
TOL = 1e-4
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64)


def llama(rope=None, **kw):
    rope = rope or {"rope_type": "default", "rope_theta": 10_000.0}
    return transformers.LlamaConfig(**COMMON, rope_parameters=rope, tie_word_embeddings=False, **kw)


CASES = {
    "llama": lambda: llama(),
    "llama_linear": lambda: llama({"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}),
    "llama3": lambda: llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                             "rope_theta": 500_000.0}),
    "llama_yarn": lambda: llama({"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 16, "rope_theta": 10_000.0}),
    "qwen2_bias": lambda: transformers.Qwen2Config(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True),
    "qwen3_qknorm": lambda: transformers.Qwen3Config(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True, rms_norm_eps=1e-6),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=8.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def random_hf_model(hf_config, seed=0):
    """An HF model in float32 eval mode with weights large enough for logits to vary."""
    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            else:  # norms and biases: away from 1 (or 0 for Gemma's 1 + w)
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits
    return torch.log_softmax(logits.double(), -1).numpy()


def kestrel_logprobs(model, tokens):
    # Jitted: eager op-by-op dispatch compiles every op separately and is far slower on CPU.
    logits = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(tokens))
    return np.asarray(jax.nn.log_softmax(logits, -1))


def kestrel_cached_logprobs(model, tokens):
    """Log-probs from one-token steps through a KVCache (the cached decoding path)."""
    graphdef, state = nnx.split(model)
    # A pure jax.jit step: nnx.jit would re-walk the module graph on each of the 32 calls.
    step = jax.jit(lambda state, tok, cache: nnx.merge(graphdef, state)(tok, cache=cache))
    cache = KVCache.create(model.config, batch=tokens.shape[0], max_len=tokens.shape[1])
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = step(state, jnp.asarray(tokens[:, t:t + 1]), cache)
        out.append(np.asarray(jax.nn.log_softmax(logits, -1)))
    return np.concatenate(out, axis=1)


def convert_hf(hf_model, tmp_path, **save_kwargs):
    src = tmp_path / "hf"
    hf_model.save_pretrained(src, **save_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files in a random model
        ckpt = convert_checkpoint(src, tmp_path / "ckpt")
    model, _ = load_checkpoint(ckpt)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logprobs_match_transformers(case, tmp_path):
    hf_model = random_hf_model(CASES[case]())
    tokens = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, (1, SEQ))
    expected = hf_logprobs(hf_model, tokens)
    model = convert_hf(hf_model, tmp_path)
    assert model.config.architecture == hf_model.config.model_type
    full = kestrel_logprobs(model, tokens)
    assert np.abs(full - expected).max() <= TOL
    # The check has teeth: logits vary far more than the tolerance.
    assert np.ptp(expected, axis=-1).min() > 1.0
    cached = kestrel_cached_logprobs(model, tokens)
    assert np.abs(cached - expected).max() <= TOL
