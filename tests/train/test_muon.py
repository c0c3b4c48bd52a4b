"""``optimizer.kind=muon``: Muon for the hidden matrices, AdamW for the rest, sharded like AdamW."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import kestrel_nano_tiny
from sharding.mesh import MeshConfig
from train.config import CheckpointConfig, OptimizerConfig
from train.loop import run
from train.optimizer import make_optimizer, muon_axes


def test_muon_takes_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    assert muon_axes("blocks/0/attn/q_proj", 3) == (0, (1, 2))  # [D, H, hd]: one D x (H * hd) matrix
    assert muon_axes("blocks/1/attn/o_proj", 3) == ((0, 1), 2)  # [H, hd, D]
    assert muon_axes("blocks/0/mlp/down", 2) == (0, 1)
    assert muon_axes("token_shift/mix", 2) == (0, 1)
    for path, ndim in (("embed/table", 2), ("lm_head", 2), ("blocks/0/attn_norm/scale", 1),
                       ("vision/blocks/0/mlp/up", 2), ("final_norm/scale", 1)):
        assert muon_axes(path, ndim) is None, path


def _params():
    rng = np.random.default_rng(0)
    return {"blocks": {0: {"attn": {"q_proj": jnp.asarray(rng.normal(size=(16, 2, 8)), jnp.float32)},
                           "mlp": {"up": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)},
                           "attn_norm": {"scale": jnp.ones((16,))}}},
            "embed": {"table": jnp.asarray(rng.normal(size=(10, 16)), jnp.float32)}}


def _spread(shape, seed):
    """A matrix of `shape` with singular values geometrically from 5 down to 0.25."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
    k = min(shape)
    return jnp.asarray(u[:, :k] @ np.diag(np.geomspace(5, 0.25, k)) @ v[:, :k].T, jnp.float32)


def _muon(weight_decay=0.0):
    cfg = OptimizerConfig(kind="muon", learning_rate=1.0, warmup_steps=0, end_lr_ratio=1.0,
                          weight_decay=weight_decay, clip_norm=None)
    return make_optimizer(cfg, total_steps=10)[0]


def test_muon_orthogonalises_hidden_updates_at_adamw_scale_and_adamw_moves_the_embeddings():
    params = _params()
    grads = jax.tree.map(jnp.array, params)
    # Matrix gradients whose singular values spread over a factor of 20.
    grads["blocks"][0]["mlp"]["up"] = _spread((16, 32), seed=1)
    grads["blocks"][0]["attn"]["q_proj"] = _spread((16, 16), seed=2).reshape(16, 2, 8)
    tx = _muon()
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, shape in ((updates["blocks"][0]["mlp"]["up"], (16, 32)),
                     (updates["blocks"][0]["attn"]["q_proj"].reshape(16, 16), (16, 16))):
        s = np.linalg.svd(np.asarray(u), compute_uv=False)
        # Newton-Schulz's quintic leaves singular values in roughly [0.7, 1.2]; consistent RMS
        # 0.2 then scales by 0.2 * sqrt(max(fan_in, fan_out)).
        scale = 0.2 * np.sqrt(max(shape))
        assert 0.5 < s.min() / scale and s.max() / scale < 1.3, (s / scale)
    # The embedding table gets Adam's elementwise step: about -lr * sign(g) on a first update.
    emb = np.asarray(updates["embed"]["table"])
    np.testing.assert_allclose(np.abs(emb), 1.0, rtol=0.02)
    np.testing.assert_array_equal(np.sign(emb), -np.sign(np.asarray(grads["embed"]["table"])))


def test_weight_decay_reaches_every_matrix_and_no_norm():
    params = _params()
    tx = _muon(weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path in (("blocks", 0, "mlp", "up"), ("blocks", 0, "attn", "q_proj"), ("embed", "table")):
        u, p = updates, params
        for k in path:
            u, p = u[k], p[k]
        np.testing.assert_allclose(u, -0.5 * np.asarray(p), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(updates["blocks"][0]["attn_norm"]["scale"], np.zeros(16))


def _tiny_muon(mesh: MeshConfig, strategy: str):
    cfg = kestrel_nano_tiny.config()
    return dataclasses.replace(
        cfg, model=cfg.model.replace(num_layers=1, layer_types=None), steps=4, mesh=mesh,
        strategy=strategy, optimizer=dataclasses.replace(cfg.optimizer, kind="muon"),
        checkpoint=CheckpointConfig(every_steps=0),
        compiler_options={"xla_backend_optimization_level": 0})


def test_muon_run_sharded_fsdp_by_tensor_equals_one_device(tmp_path):
    single = run(_tiny_muon(MeshConfig(1, 1, 1), "dp"), tmp_path / "one", devices=jax.devices()[:1])
    sharded = run(_tiny_muon(MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp"), tmp_path / "eight")
    a = np.array([single.losses[s] for s in range(1, 5)])
    b = np.array([sharded.losses[s] for s in range(1, 5)])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=0)
    assert a[-1] < a[0] - 1e-3  # it trains
    q_proj = sharded.params["blocks"][0]["attn"]["q_proj"]
    assert q_proj.sharding.spec[:2] == ("fsdp", "tensor")
