"""Logical-axis rules: parameter, optimizer-state and batch shardings per strategy."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.transformer import init_model
from sharding.mesh import MeshConfig, make_mesh
from train.config import OptimizerConfig
from train.optimizer import make_optimizer
from sharding.rules import (STRATEGIES, batch_sharding, batch_shards, logical_to_spec,
                            optimizer_shardings, param_shardings, param_specs, strategy_rules)

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, tie_embeddings=False, attention_bias=True)


@pytest.fixture(scope="module")
def abstract_state():
    return nnx.split(nnx.eval_shape(lambda: init_model(CFG, 0)), nnx.Param)[1]


def test_fsdp_tp_specs(abstract_state):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    specs = param_specs(abstract_state, strategy_rules("fsdp_tp"), mesh)
    attn, mlp = specs["blocks"][0]["attn"], specs["blocks"][0]["mlp"]
    assert attn["q_proj"] == P("fsdp", "tensor", None)        # [D, N, H]
    assert attn["k_proj"] == P("fsdp", "tensor", None)        # [D, K, H]
    assert attn["o_proj"] == P("tensor", None, "fsdp")        # [N, H, D]
    assert attn["q_bias"] == P("tensor", None)
    assert mlp["gate"] == P("fsdp", "tensor") and mlp["down"] == P("tensor", "fsdp")
    assert specs["embed"]["table"] == P("tensor", "fsdp")     # [V, D]
    assert specs["lm_head"] == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"] == P(None)


def test_dp_replicates_and_fsdp_shards_width(abstract_state):
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    dp = param_specs(abstract_state, strategy_rules("dp"), mesh)
    assert all(all(a is None for a in s) for s in jax.tree.leaves(dp, is_leaf=lambda x: isinstance(x, P)))
    fsdp = param_specs(abstract_state, strategy_rules("fsdp"), mesh)
    assert fsdp["blocks"][0]["mlp"]["up"] == P("fsdp", None)
    assert fsdp["blocks"][0]["attn"]["q_proj"] == P("fsdp", None, None)


def test_rules_fall_back_to_replication():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    rules = strategy_rules("fsdp_tp")
    # 12 is not divisible by 8: that dimension stays whole rather than failing.
    assert logical_to_spec(("embed", "mlp"), (12, 16), rules, mesh) == P(None, None)
    # The tensor axis has size 1 here, so heads are not split over it.
    assert logical_to_spec(("embed", "heads"), (16, 4), rules, mesh) == P("fsdp", None)
    # A mesh axis is used at most once per array.
    assert logical_to_spec(("embed", "embed"), (16, 16), rules, mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match="do not match"):
        logical_to_spec(("embed",), (16, 16), rules, mesh)
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        strategy_rules("zero3")


def test_optimizer_state_follows_parameters(abstract_state):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    p_shard = param_shardings(abstract_state, strategy_rules("fsdp_tp"), mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), p_shard)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    o_shard = optimizer_shardings(jax.eval_shape(tx.init, params), p_shard, mesh)
    adam = o_shard[1][0]
    assert adam.mu["blocks"][0]["attn"]["q_proj"].spec == P("fsdp", "tensor", None)
    assert adam.nu["lm_head"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P()
    # And real initialisation under those shardings places moments like their parameters.
    fast = {"xla_backend_optimization_level": 0}  # compiles several times faster on CPU
    real = jax.jit(lambda: nnx.to_pure_dict(nnx.state(init_model(CFG, 0), nnx.Param)),
                   out_shardings=p_shard, compiler_options=fast)()
    state = jax.jit(tx.init, out_shardings=o_shard, compiler_options=fast)(real)
    mu = state[1][0].mu["blocks"][0]["mlp"]["gate"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    assert mu.addressable_shards[0].data.shape == (32 // 4, 64 // 2)


def test_muon_state_follows_parameters(abstract_state):
    """Muon's partition by parameter name cannot be traced with optax's placeholder; its moments
    still land where their parameters are (matched by path)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    p_shard = param_shardings(abstract_state, strategy_rules("fsdp_tp"), mesh)
    params = nnx.to_pure_dict(abstract_state)
    tx, _ = make_optimizer(OptimizerConfig(kind="muon"), total_steps=10)
    o_shard = optimizer_shardings(jax.eval_shape(tx.init, params), p_shard, mesh)
    specs = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_flatten_with_path(
        o_shard, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
    muon_q = [p for p in specs if "'muon'" in p and p.endswith("['q_proj']")]
    adam_head = [p for p in specs if "'adam'" in p and p.endswith("['lm_head']")]
    assert muon_q and adam_head, sorted(specs)
    assert all(specs[p] == P("fsdp", "tensor", None) for p in muon_q)
    assert all(specs[p] == P("tensor", "fsdp") for p in adam_head)
    assert all(s == P() for p, s in specs.items() if p.endswith((".count", "ns_coeffs")))


def test_batch_sharding():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding = batch_sharding(mesh)
    assert sharding.spec == P(("data", "fsdp"), None)
    assert batch_shards(mesh) == 4
    x = jax.device_put(np.arange(8 * 3).reshape(8, 3), sharding)
    assert x.addressable_shards[0].data.shape == (2, 3)
    assert set(STRATEGIES) == {"dp", "fsdp", "fsdp_tp"}
