"""HF config.json -> ModelConfig: both transformers generations, and refusals that name the field."""

import math

import pytest

from kestrel.errors import KestrelError
from model.convert import hf_config_from_model, model_config_from_hf

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def test_transformers4_llama3_config():
    cfg = model_config_from_hf({**BASE, "model_type": "llama", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                "tie_word_embeddings": True, "head_dim": None})
    assert cfg.architecture == "llama" and cfg.head_dim == 16 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 32.0
    assert cfg.rope_scaling.original_max_position_embeddings == 8192
    assert cfg.tie_embeddings and cfg.norm_eps == 1e-5 and not cfg.attention_bias


def test_old_style_linear_scaling_and_yarn_default_original_context():
    cfg = model_config_from_hf({**BASE, "architectures": ["LlamaForCausalLM"],
                                "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope_scaling.type == "linear" and cfg.rope_scaling.factor == 4.0
    assert cfg.rope_theta == 10_000.0 and not cfg.tie_embeddings  # Llama's class defaults
    yarn = model_config_from_hf({**BASE, "model_type": "qwen3",
                                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}})
    assert yarn.rope_scaling.original_max_position_embeddings == 2048 and yarn.qk_norm


def test_transformers4_gemma3_config():
    cfg = model_config_from_hf({**BASE, "model_type": "gemma3_text", "head_dim": 32, "rope_theta": 1e6,
                                "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                "query_pre_attn_scalar": 256, "sliding_window": 512,
                                "sliding_window_pattern": 2, "final_logit_softcapping": None,
                                "hidden_activation": "gelu_pytorch_tanh"})
    assert cfg.layer_types == ("sliding", "global", "sliding", "global") and cfg.sliding_window == 512
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.rope_scaling.factor == 8.0
    assert math.isclose(cfg.scale, 1 / 16) and cfg.activation == "gelu_tanh"
    assert cfg.norm_plus_one and cfg.post_norms and cfg.embed_scale and cfg.qk_norm and cfg.tie_embeddings


def test_gemma3_attn_softcap_is_ignored_like_transformers():
    with pytest.warns(UserWarning, match="attn_logit_softcapping is ignored"):
        cfg = model_config_from_hf({**BASE, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0,
                                    "final_logit_softcapping": 30.0})
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap == 30.0


def test_qwen2_sliding_layers_from_max_window_layers():
    cfg = model_config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": True,
                                "sliding_window": 256, "max_window_layers": 2})
    assert cfg.layer_types == ("global", "global", "sliding", "sliding") and cfg.sliding_window == 256
    assert cfg.attention_bias and not cfg.qk_norm
    off = model_config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": False,
                                "sliding_window": 256, "max_window_layers": 2})
    assert set(off.layer_types) == {"global"} and off.sliding_window is None


@pytest.mark.parametrize("extra, message", [
    ({"model_type": "mamba"}, "unsupported architecture 'mamba'"),
    ({"model_type": "llama", "attention_bias": True}, "o_proj"),
    ({"model_type": "qwen3", "attention_bias": True}, "o_proj"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "llama", "hidden_act": "relu"}, "activation 'relu'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5,
      "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"model_type": "qwen3", "partial_rotary_factor": 0.25}, "partial_rotary_factor"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional"),
    ({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default"},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, "scaled local RoPE"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"] * 2}, "chunked_attention"),
    ({"model_type": "llama", "num_key_value_heads": 3}, "multiple of num_kv_heads"),
])
def test_refusals_name_the_problem(extra, message):
    with pytest.raises(KestrelError, match=message):
        model_config_from_hf({**BASE, **extra})


def test_missing_field_is_named():
    hf = {**BASE, "model_type": "qwen2"}
    del hf["intermediate_size"]
    with pytest.raises(KestrelError, match="intermediate_size"):
        model_config_from_hf(hf)


@pytest.mark.parametrize("hf", [
    {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 512,
                                                        "rope_theta": 5e5}},
    {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
    {**BASE, "model_type": "qwen3", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                        "beta_fast": 16.0}},
    {**BASE, "model_type": "gemma3_text", "query_pre_attn_scalar": 24, "sliding_window": 16,
     "final_logit_softcapping": 30.0},
])
def test_export_config_reads_back_the_same(hf):
    cfg = model_config_from_hf(hf)
    assert model_config_from_hf(hf_config_from_model(cfg)) == cfg
