"""int8 weight quantization (qwix QArrays): bad types, closeness to float, bytes, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from kestrel.cli import main
from kestrel.errors import KestrelError
from model.checkpoint import abstract_params, load_checkpoint, model_from_params, read_meta, save_checkpoint
from model.config import ModelConfig
from model.quantization import UnsupportedQuantization, quantize_model, tree_bytes

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48)
CONFIGS = {
    "llama_tied": ModelConfig(**BASE),
    "qwen2_untied_bias": ModelConfig(**BASE, attention_bias=True, tie_embeddings=False),
    "gemma_softcap": ModelConfig(**BASE, activation="gelu_tanh", norm_plus_one=True, qk_norm=True,
                                 post_norms=True, embed_scale=True, final_logit_softcap=30.0),
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def random_model(cfg, seed=0, std=0.3):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype),
                          abstract_params(cfg))
    return model_from_params(cfg, params)


forward = nnx.jit(lambda model, tokens: model(tokens)[0])  # one compile, not op by op


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("bad", ["int4", "fp8", "INT8", "w8a8"])
def test_unknown_type_is_a_clear_error(bad, tmp_path):
    model = random_model(CONFIGS["llama_tied"])
    for call in (lambda: quantize_model(model, bad),
                 lambda: ModelConfig(**BASE, quantization=bad),
                 lambda: load_checkpoint(tmp_path / "missing", quantize=bad)):
        with pytest.raises(UnsupportedQuantization, match=rf"{bad!r} is not supported.*int8-w8a8"):
            call()


def test_convert_checks_the_type_before_any_work(tmp_path, capsys):
    # The source does not exist either: the quantization error comes first, nothing is written.
    assert main(["convert", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out"),
                 "--quantize", "int3"]) == 2
    assert "quantization type 'int3' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["int8", "int8-w8a8"])
def test_int8_logits_close_to_float(name, mode):
    """Stated tolerance, on random models with N(0, 0.3) weights (harsher than trained ones):
    max abs logit diff under 4% of the float logits' max, log-probabilities within 0.05 nats on
    average and 0.25 at worst (measured: 1.4-3.1%, 0.004-0.036 mean, 0.02-0.17 max)."""
    model = random_model(CONFIGS[name])
    quant = quantize_model(model, mode)
    want, got = forward(model, TOKENS), forward(quant, TOKENS)
    span = float(jnp.abs(want).max())
    assert 0 < float(jnp.abs(got - want).max()) < 0.04 * span  # > 0: really quantized
    diff = jnp.abs(jax.nn.log_softmax(got, axis=-1) - jax.nn.log_softmax(want, axis=-1))
    assert float(diff.mean()) < 0.05 and float(diff.max()) < 0.25


@pytest.mark.parametrize("mode", ["int8", "int8-w8a8"])
def test_weights_are_stored_int8_with_channel_scales(mode):
    cfg = CONFIGS["qwen2_untied_bias"]
    model = random_model(cfg)
    quant = quantize_model(model, mode)
    p = params_of(quant)
    q_proj, table = p["blocks"][0]["attn"]["q_proj"], p["embed"]["table"]
    assert isinstance(q_proj, qwix.QArray) and q_proj.qvalue.dtype == jnp.int8
    assert q_proj.scale.shape == (1, cfg.num_heads, cfg.head_dim)  # per output channel
    assert table.qvalue.dtype == jnp.int8 and table.scale.shape == (cfg.vocab_size, 1)  # per row
    assert isinstance(p["lm_head"], qwix.QArray)
    assert not isinstance(p["blocks"][0]["attn"]["q_bias"], qwix.QArray)  # biases stay float
    f32 = tree_bytes(params_of(model))
    bf16 = tree_bytes(params_of(random_model(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))))
    assert tree_bytes(p) <= 0.3 * f32 and tree_bytes(p) <= 0.6 * bf16  # tiny D: scales weigh more


def test_w8a8_multiplies_in_int8():
    """The w8a8 model's matmuls are int8 x int8 -> int32 dots; weight-only ones are float."""
    def int_dots(mode):
        quant = quantize_model(random_model(CONFIGS["llama_tied"]), mode)
        jaxpr = jax.make_jaxpr(lambda t: quant(t)[0])(TOKENS)
        return sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                   and all(v.aval.dtype == jnp.int8 for v in e.invars))

    layers = CONFIGS["llama_tied"].num_layers
    assert int_dots("int8-w8a8") == layers * 7 + 1  # q k v o gate up down per layer, LM head
    assert int_dots("int8") == 0


def test_quantized_checkpoint_round_trip(tmp_path):
    cfg = CONFIGS["qwen2_untied_bias"]
    model = random_model(cfg)
    quant = quantize_model(model, "int8")
    ckpt = save_checkpoint(quant, tmp_path / "q")
    meta = read_meta(ckpt)
    assert meta["quantization"] == "int8" and meta["param_bytes"] == tree_bytes(params_of(quant))
    loaded, _ = load_checkpoint(ckpt)
    assert loaded.config.quantization == "int8"
    for a, b in zip(jax.tree.leaves(params_of(quant)), jax.tree.leaves(params_of(loaded))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(forward(loaded, TOKENS), forward(quant, TOKENS))
    # A float checkpoint quantized at load equals quantize_model; a quantized one refuses another type.
    save_checkpoint(model, tmp_path / "f")
    at_load, _ = load_checkpoint(tmp_path / "f", quantize="int8")
    np.testing.assert_array_equal(forward(at_load, TOKENS), forward(quant, TOKENS))
    with pytest.raises(KestrelError, match="quantized int8; it cannot be loaded as int8-w8a8"):
        load_checkpoint(ckpt, quantize="int8-w8a8")
    with pytest.raises(UnsupportedQuantization, match="already quantized"):
        quantize_model(quant, "int8")
