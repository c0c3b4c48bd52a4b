"""Copy layers (``ModelConfig.embedding_value_layers``): their values are the projected token
embeddings, not the residual stream; cached decoding (with token shift, early exit's state
copying aside) equals the full forward; bad layer lists and export are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding_checks import greedy, greedy_matching_forward
from kestrel.errors import KestrelError
from model import ModelConfig, init_model
from model.convert.hf_config import hf_config_from_model
from model.rope import rope_tables
from model.transformer import rope_frequencies

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, qk_norm=True, max_position_embeddings=64,
                  token_shift=True, embedding_value_layers=(1,))


def sharp_model(cfg=CFG, seed=0):
    model = init_model(cfg, seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params))
    return model


def test_values_come_from_the_token_embeddings():
    model = sharp_model()
    assert model.blocks[1].attn.value_norm is not None and model.blocks[0].attn.value_norm is None
    tokens = jnp.array([[3, 9, 4, 12]])
    emb = model.embed(tokens)
    hidden = jax.random.normal(jax.random.key(0), (1, 4, CFG.hidden_size))
    rope = rope_tables(jnp.arange(4)[None], *rope_frequencies(CFG)["global"])
    attn = model.blocks[1].attn
    _, _, v = attn.project(hidden, rope, emb)
    _, _, v_other = attn.project(hidden * 3 + 1, rope, emb)  # another residual, same tokens
    np.testing.assert_allclose(v, v_other, atol=1e-6)
    expected = jnp.einsum("btd,dkh->btkh", attn.value_norm(emb), attn.v_proj[...])
    np.testing.assert_allclose(v, expected, atol=1e-5)
    with pytest.raises(ValueError, match="token embeddings"):
        attn.project(hidden, rope)


def test_cached_decoding_equals_the_full_forward_and_the_copy_layer_matters():
    model = sharp_model()
    outputs = greedy_matching_forward(model)
    # The same weights with the layer's values read from the residual continue otherwise.
    plain = init_model(CFG.replace(embedding_value_layers=()), 0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del params["blocks"][1]["attn"]["value_norm"]
    nnx.update(plain, nnx.State(params))
    assert greedy(plain) != outputs


@pytest.mark.parametrize("layers", [(2,), (-1,), (1, 0), (0, 0)])
def test_bad_layer_lists_are_refused(layers):
    with pytest.raises(ValueError, match="embedding_value_layers"):
        CFG.replace(embedding_value_layers=layers)


def test_config_round_trips_and_export_is_refused():
    assert ModelConfig.from_json(CFG.to_json()) == CFG
    assert CFG.num_params == sum(x.size for x in jax.tree.leaves(nnx.state(init_model(CFG, 0), nnx.Param)))
    with pytest.raises(KestrelError, match="embedding_value_layers"):
        hf_config_from_model(CFG.replace(qk_norm=False, token_shift=False))
