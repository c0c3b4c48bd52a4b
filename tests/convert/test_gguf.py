"""convert_checkpoint on GGUF files written with gguf.GGUFWriter as llama.cpp writes them."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kestrel.errors import KestrelError
from model.checkpoint import load_checkpoint, read_meta
from model.convert import convert_checkpoint

TOKENS = np.random.default_rng(0).integers(0, 64, (1, 16))
CFG = dict(tie_word_embeddings=False, intermediate_size=64, rms_norm_eps=1e-5,
           rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    """The llama.cpp tensor name of an HF llama tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, *rest = hf_name.split(".")
    part = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{i}.{part}.weight"


def write_gguf(path, hf_model, qtypes, raw=None, rope_scaling=None):
    """Writes hf_model as a llama GGUF; returns the state dict as the GGUF stores it (rounded).

    qtypes maps a GGUF tensor-name suffix to its type (F32 by default); raw maps a GGUF name to
    (bytes, type) written as they are; rope_scaling overrides the scaling type written.
    """
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling)
    elif c.rope_parameters["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_parameters["factor"])
    stored = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        w = tensor.numpy().astype(np.float32)
        g = gguf_name(name)
        if g.endswith("attn_q.weight"):
            w_gguf = llama_cpp_permute(w, c.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            w_gguf = llama_cpp_permute(w, c.num_key_value_heads)
        else:
            w_gguf = w
        if raw and g in raw:
            data, qtype = raw[g]
            writer.add_tensor(g, data, raw_dtype=qtype)
            continue
        qtype = next((t for suffix, t in qtypes.items() if g.endswith(suffix)), Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(g, w_gguf)
            stored[name] = w
        elif qtype == Q.F16:
            writer.add_tensor(g, w_gguf.astype(np.float16))
            stored[name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(g, quantize(w_gguf, qtype), raw_dtype=qtype)
            # Quantization blocks run along rows, which the q/k permutation only reorders.
            stored[name] = dequantize(quantize(w, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_gguf_conversion_equals_the_stored_weights(tmp_path, make_hf_model, logits_of, kestrel_logits):
    hf_model = make_hf_model("llama", **CFG)
    qtypes = {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.F16, "ffn_down.weight": Q.Q8_0,
              "ffn_up.weight": Q.F16, "token_embd.weight": Q.Q8_0}
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, hf_model, qtypes)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        original = hf_model.state_dict()[name].numpy()
        assert 0 < np.abs(stored[name] - original).max() < 0.01  # really quantized, not garbage
    with pytest.warns(UserWarning, match="no tokenizer"):
        ckpt = convert_checkpoint(path, tmp_path / "ckpt")
    assert read_meta(ckpt)["source"]["format"] == "gguf"
    model, _ = load_checkpoint(ckpt)
    assert model.config.rope_theta == 50_000.0 and model.config.norm_eps == 1e-5
    assert not model.config.tie_embeddings
    # The reference: transformers with exactly the weights the GGUF holds.
    hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()})
    np.testing.assert_allclose(kestrel_logits(model, TOKENS), logits_of(hf_model, TOKENS), atol=1e-4, rtol=0)
    # q/k rows are back in rotate-half order: the F16 k_proj equals the original rounded.
    k = np.asarray(model.blocks[0].attn.k_proj[...])  # [D, K, H]
    expected = stored["model.layers.0.self_attn.k_proj.weight"].T.reshape(k.shape)
    np.testing.assert_array_equal(k, expected)


def test_gguf_tied_embeddings_and_linear_rope(tmp_path, make_hf_model, logits_of, kestrel_logits):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}
    hf_model = make_hf_model("llama", **{**CFG, "tie_word_embeddings": True, "rope_parameters": rope})
    path = tmp_path / "tied.gguf"
    write_gguf(path, hf_model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_checkpoint(convert_checkpoint(path, tmp_path / "ckpt"))
    assert model.config.tie_embeddings and model.lm_head is None
    assert model.config.rope_scaling.type == "linear" and model.config.rope_scaling.factor == 2.0
    np.testing.assert_allclose(kestrel_logits(model, TOKENS), logits_of(hf_model, TOKENS), atol=1e-4, rtol=0)


def test_unknown_quantization_type_names_it_and_the_tensor(tmp_path, make_hf_model):
    hf_model = make_hf_model("llama", **CFG)
    # Q8_1 is a real ggml type that gguf.quants cannot dequantize: 40 bytes per 32 values.
    data = np.random.default_rng(0).integers(0, 255, (16, 40), dtype=np.uint8)
    path = tmp_path / "odd.gguf"
    write_gguf(path, hf_model, {}, raw={"blk.1.attn_v.weight": (data, Q.Q8_1)})
    with pytest.raises(KestrelError, match=r"quantization type Q8_1 for tensor 'blk\.1\.attn_v\.weight'"):
        convert_checkpoint(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_gguf_rope_scaling_is_refused(tmp_path, make_hf_model):
    path = tmp_path / "yarn.gguf"
    write_gguf(path, make_hf_model("llama", **CFG), {}, rope_scaling=gguf.RopeScalingType.YARN)
    with pytest.raises(KestrelError, match="yarn.gguf: GGUF rope scaling 'yarn' is not supported"):
        convert_checkpoint(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_gguf_is_an_error(tmp_path, make_hf_model):
    path = tmp_path / "cut.gguf"
    write_gguf(path, make_hf_model("llama", **CFG), {})
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(KestrelError, match="cut.gguf"):
        convert_checkpoint(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
