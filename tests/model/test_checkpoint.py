"""Kestrel checkpoint folders: save/load round trips, dtypes, sharded restore, atomic writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kestrel.errors import KestrelError
from model.checkpoint import (abstract_params, atomic_output_dir, flatten_params, load_checkpoint,
                              model_from_params, read_meta, restore_params, save_checkpoint)
from model.config import ModelConfig

CFG = ModelConfig(vocab_size=48, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                  intermediate_size=24, tie_embeddings=False, attention_bias=True, qk_norm=True,
                  layer_types=("sliding", "global"), sliding_window=4, rope_local_theta=1000.0)


def init_model(cfg, seed=0):
    """A Transformer with random weights drawn in numpy (model.init_model compiles op by op in
    eager mode, which is slow on a busy CPU; the model object is the same)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype),
                          abstract_params(cfg))
    return model_from_params(cfg, params)


def flat_params(model):
    return {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def test_save_load_round_trip(tmp_path):
    model = init_model(CFG, seed=1)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", source={"note": "test"})
    assert read_meta(ckpt)["source"] == {"note": "test"}
    assert read_meta(ckpt)["num_params"] == CFG.num_params
    loaded, tokenizer = load_checkpoint(ckpt)
    assert tokenizer is None and loaded.config == CFG
    a, b = flat_params(model), flat_params(loaded)
    assert a.keys() == b.keys() and len(a) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    tokens = jnp.arange(10)[None] % CFG.vocab_size
    forward = nnx.jit(lambda m, x: m(x)[0])
    np.testing.assert_array_equal(np.asarray(forward(model, tokens)), np.asarray(forward(loaded, tokens)))


def test_load_with_dtype(tmp_path):
    model = init_model(CFG, seed=2)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    half, _ = load_checkpoint(ckpt, dtype="bfloat16")
    assert half.config.dtype == half.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(half.lm_head[...]),
                                  np.asarray(model.lm_head[...].astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(ckpt, dtype="int4")


def test_restore_onto_a_mesh(tmp_path):
    """The abstract-shape restore places each array with the sharding the target asks for."""
    ckpt = save_checkpoint(init_model(CFG, seed=3), tmp_path / "ckpt")
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(
            mesh, P(None, "model") if s.ndim == 2 and s.shape[1] % 2 == 0 else P())),
        abstract_params(CFG))
    params = restore_params(ckpt, target)
    up = params["blocks"][0]["mlp"]["up"]
    assert up.sharding == NamedSharding(mesh, P(None, "model"))
    assert len(up.addressable_shards) == 2 and up.addressable_shards[0].data.shape == (16, 12)
    plain = restore_params(ckpt)
    np.testing.assert_array_equal(np.asarray(up), np.asarray(plain["blocks"][0]["mlp"]["up"]))


def test_existing_folder_is_refused_unless_forced(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(init_model(CFG, seed=4), out)
    with pytest.raises(KestrelError, match="already exists"):
        save_checkpoint(init_model(CFG, seed=5), out)
    save_checkpoint(init_model(CFG, seed=5), out, force=True)
    loaded, _ = load_checkpoint(out)
    np.testing.assert_array_equal(np.asarray(loaded.embed.table[...]),
                                  np.asarray(init_model(CFG, seed=5).embed.table[...]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class FailingTokenizer:
    """A tokenizer whose save writes part of its files, then fails (a full disk, say)."""

    def save(self, directory):
        (directory / "tokenizer.json").write_text("{")
        raise OSError("No space left on device")


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(init_model(CFG), tmp_path / "new", tokenizer=FailingTokenizer())
    assert list(tmp_path.iterdir()) == []
    old = save_checkpoint(init_model(CFG, seed=6), tmp_path / "old")
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(init_model(CFG, seed=7), old, tokenizer=FailingTokenizer(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    loaded, _ = load_checkpoint(old)
    np.testing.assert_array_equal(np.asarray(loaded.embed.table[...]),
                                  np.asarray(init_model(CFG, seed=6).embed.table[...]))


def test_atomic_output_dir_only_appears_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(KestrelError, match="not a Kestrel checkpoint"):
        load_checkpoint(tmp_path)
