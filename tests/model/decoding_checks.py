"""A check shared by the model tests: cached greedy decoding equals the full forward pass."""

import jax.numpy as jnp
from flax import nnx

from model.generate import GenerationConfig, Generator

PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 8], [30, 31, 32, 33])


def greedy_matching_forward(model, prompts=PROMPTS, max_new_tokens: int = 9) -> list[list[int]]:
    """Greedy outputs of `model` for `prompts`, after asserting each equals the full forward's argmax.

    One causal forward pass over prompt + output scores every generated position: greedy decoding
    (through the KV cache) was right iff each output token is the argmax after the tokens before it.
    """
    results = Generator(model).generate([list(p) for p in prompts], GenerationConfig(max_new_tokens=max_new_tokens))
    forward = nnx.jit(lambda m, tokens: m(tokens)[0])
    for prompt, result in zip(prompts, results):
        seq = list(prompt) + result.token_ids
        logits = forward(model, jnp.array([seq]))[0]
        assert jnp.argmax(logits[len(prompt) - 1:-1], -1).tolist() == result.token_ids
    return [r.token_ids for r in results]


def greedy(model, prompts=PROMPTS, max_new_tokens: int = 9) -> list[list[int]]:
    """Greedy outputs of `model` for `prompts`."""
    return [r.token_ids for r in Generator(model).generate([list(p) for p in prompts],
                                                           GenerationConfig(max_new_tokens=max_new_tokens))]
