"""A tiny real model whose next-token distribution is the same at every step (a "unigram" model).

The blocks' output projections are zero and every embedding row is the same vector, so the final
hidden state is constant and the logits are ``lm_head @ h``: a fixed vector that the test picks.
Sampled through the engine's channel machine, this gives streams with a known shape (think first,
a few reasoning tokens, then an answer or a tool call) while every layer of the model, the paged
KV cache and the grammar masks still run for real.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import init_model

LINES = [
    "What is 2 + 2? It is 4. Let me think about 12 * 12 = 144.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello there, how are you today? I am fine, thank you.",
    '{"name": "calculator", "arguments": {"expression": "1 + 2"}}',
    "get_weather city Paris London Berlin temperature unit celsius",
]

# Logits of the unigram model; every token not listed gets BASE.
BASE = -12.0
PREFERENCES = {
    "<think>": 12.0,  # always opens reasoning when it may
    "<|im_end|>": 1.0,  # ends the answer after a few tokens
    "</think>": -1.0,  # reasoning usually runs into its budget
    "1": 2.5,
    "2": 2.5,
    "+": 1.5,
    '"': 2.5,  # closes JSON strings after a few characters
}


def build_tokenizer() -> Tokenizer:
    return Tokenizer.train_sentencepiece(LINES * 20, 400)


def build_model(tok: Tokenizer, preferences: dict[str, float] | None = None, *, seed: int = 0):
    """A 2-layer model whose logits are ``preferences`` (by token string) at every position."""
    vocab = tok.vocab_size
    vocab = ((vocab + 31) // 32) * 32
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=1024,
                      tie_embeddings=False)
    model = init_model(cfg, seed)
    u = np.full((vocab,), BASE, np.float32)
    for text, logit in (PREFERENCES if preferences is None else preferences).items():
        i = tok.token_to_id(text)
        if i is None:
            ids = tok.encode(text)
            assert len(ids) == 1, (text, ids)
            i = ids[0]
        u[i] = logit
    state = nnx.state(model, nnx.Param)

    def fix(path, x):
        name = "/".join(str(p) for p in path)
        if name.endswith("o_proj") or name.endswith("mlp/down"):
            return jnp.zeros_like(x)
        if name.startswith("embed/table"):
            return jnp.ones_like(x)
        if name.startswith("final_norm"):
            return jnp.ones_like(x)
        if name.startswith("lm_head"):
            # h is all ones after the final norm, so logits[v] = sum_d lm_head[v, d] = u[v].
            return jnp.asarray(np.repeat(u[:, None] / x.shape[1], x.shape[1], axis=1), x.dtype)
        return x

    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, x: fix([getattr(k, "key", getattr(k, "name", k)) for k in p], x), state))
    return model
