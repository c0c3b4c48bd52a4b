"""convert_checkpoint on Hugging Face folders: sharded sources, dtypes, tokenizers, errors."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kestrel.errors import KestrelError
from model.checkpoint import flatten_params, load_checkpoint, read_meta
from model.convert import convert_checkpoint

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def convert_quietly(src, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_checkpoint(src, out, **kwargs)


def params_of(model):
    return {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def test_converted_logits_match_and_checkpoint_is_complete(hf_llama, tmp_path, logits_of, kestrel_logits):
    src, hf_model = hf_llama
    with pytest.warns(UserWarning, match="no tokenizer"):
        ckpt = convert_checkpoint(src, tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "kestrel.json", "params"]
    meta = read_meta(ckpt)
    assert meta["format_version"] == 1 and meta["dtype"] == "float32"
    assert meta["source"]["format"] == "safetensors" and meta["source"]["architecture"] == "llama"
    model, tokenizer = load_checkpoint(ckpt)
    assert tokenizer is None
    np.testing.assert_allclose(kestrel_logits(model, TOKENS), logits_of(hf_model, TOKENS), atol=1e-4, rtol=0)


def test_sharded_source_converts_equally(hf_llama, tmp_path):
    src, hf_model = hf_llama
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, _ = load_checkpoint(convert_quietly(src, tmp_path / "a"))
    b, _ = load_checkpoint(convert_quietly(sharded, tmp_path / "b"))
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def test_bfloat16_conversion_and_load_dtype(hf_llama, tmp_path):
    src, _ = hf_llama
    ckpt = convert_quietly(src, tmp_path / "bf16", dtype="bfloat16")
    model, _ = load_checkpoint(ckpt)
    assert model.config.param_dtype == "bfloat16" and model.embed.table[...].dtype == jnp.bfloat16
    f32, _ = load_checkpoint(convert_quietly(src, tmp_path / "f32"))
    np.testing.assert_array_equal(
        np.asarray(model.embed.table[...]),
        np.asarray(f32.embed.table[...].astype(jnp.bfloat16)))
    up, _ = load_checkpoint(ckpt, dtype="float32")
    assert up.embed.table[...].dtype == jnp.float32 and up.config.dtype == "float32"


def test_existing_output_is_refused_unless_forced(hf_llama, tmp_path):
    src, _ = hf_llama
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KestrelError, match="already exists"):
        convert_quietly(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_quietly(src, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _no_output(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_shard_is_named(hf_llama, tmp_path):
    _, hf_model = hf_llama
    src = tmp_path / "sharded"
    hf_model.save_pretrained(src, max_shard_size="20KB")
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(KestrelError, match=f"shard {victim.name} is missing"):
        convert_quietly(src, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_truncated_shard_is_named(hf_llama, tmp_path):
    src, _ = hf_llama
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KestrelError, match="model.safetensors is truncated"):
        convert_quietly(src, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_unsupported_architecture_lists_supported(hf_llama, tmp_path):
    src, _ = hf_llama
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(KestrelError, match=r"unsupported architecture 'mamba'.*LlamaForCausalLM.*Qwen3"):
        convert_quietly(src, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_missing_tensor_is_named(hf_llama, tmp_path):
    src, _ = hf_llama
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KestrelError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert_quietly(src, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_shape_mismatch_is_named(hf_llama, tmp_path):
    src, _ = hf_llama
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KestrelError, match=r"k_proj\.weight' has shape \(8, 32\), expected \(16, 32\)"):
        convert_quietly(src, tmp_path / "out")
    _no_output(tmp_path, tmp_path / "out")


def test_tensor_without_a_place_is_refused(hf_llama, tmp_path):
    src, _ = hf_llama
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros((32,), np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KestrelError, match=r"o_proj\.bias' has no place"):
        convert_quietly(src, tmp_path / "out")


def test_bad_dtype_and_missing_source(tmp_path):
    with pytest.raises(KestrelError, match="dtype"):
        convert_checkpoint(tmp_path, tmp_path / "out", dtype="int8")
    with pytest.raises(KestrelError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(KestrelError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "out")
