"""``optimizer.frozen``: named parameters keep their values and take no share of the clipping norm;
a prefix naming nothing is refused before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import kestrel_nano_tiny
from kestrel.errors import KestrelError
from model.checkpoint import abstract_params
from train import loop
from train.config import OptimizerConfig
from train.optimizer import check_frozen, frozen_mask, make_optimizer


def test_frozen_parameters_get_no_update_no_decay_and_no_share_of_the_clip():
    params = {"vision": {"w": jnp.ones((2, 2)), "blocks": {0: {"b": jnp.ones((2,))}}}, "embed": jnp.ones((2, 2))}
    grads = {"vision": {"w": jnp.full((2, 2), 100.0), "blocks": {0: {"b": jnp.full((2,), 100.0)}}},
             "embed": jnp.full((2, 2), 0.5)}
    assert frozen_mask(params, ("vision",)) == {"vision": {"w": True, "blocks": {0: {"b": True}}}, "embed": False}
    assert frozen_mask(params, ("vision/blocks/0",))["vision"] == {"w": False, "blocks": {0: {"b": True}}}
    # eps = 1 makes Adam's first update -lr * g / (|g| + 1): it shows the clipped gradient.
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, clip_norm=1.0, weight_decay=0.5, end_lr_ratio=1.0,
                          eps=1.0, frozen=("vision",))
    tx, _ = make_optimizer(cfg, total_steps=10)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["vision"]["w"], np.zeros((2, 2)))
    np.testing.assert_array_equal(updates["vision"]["blocks"][0]["b"], np.zeros(2))
    # embed's gradient has global norm 1 on its own (the frozen 100s do not shrink it): g = 0.5,
    # Adam gives -0.5 / 1.5, and decay adds -0.5 * 1.
    np.testing.assert_allclose(updates["embed"], -1 / 3 - 0.5, rtol=1e-5)
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (2, 2)]
    assert len(moments) == 4 and sum(bool(np.any(np.asarray(m))) for m in moments) == 2, \
        "the frozen matrix's Adam moments stay zero"


def test_a_prefix_that_names_nothing_or_everything_is_refused():
    shapes = abstract_params(kestrel_nano_tiny.config().model)
    check_frozen(("embed", "blocks/0"), shapes)
    with pytest.raises(KestrelError, match=r"'vision' names no parameter .*blocks, embed, final_norm, lm_head"):
        check_frozen(("vision",), shapes)
    with pytest.raises(KestrelError, match="'block' names no parameter"):
        check_frozen(("block",), shapes)  # a prefix of a name is not a path prefix
    with pytest.raises(KestrelError, match="freezes every parameter"):
        check_frozen(("blocks", "embed", "final_norm", "lm_head"), shapes)


def test_the_run_refuses_it_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_jitted", lambda *a, **k: pytest.fail("compilation was reached"))
    with pytest.raises(KestrelError, match="'vision' names no parameter"):
        loop.run(kestrel_nano_tiny.config(), tmp_path, ["optimizer.frozen=('vision',)"])


@pytest.mark.slow  # two runs on an fsdp x tensor mesh (~22 s); the unsharded update test covers the mask
def test_a_sharded_run_leaves_frozen_parameters_as_they_started(tmp_path):
    overrides = ["steps=2", "mesh.fsdp=4", "mesh.tensor=2", "strategy=fsdp_tp",
                 "optimizer.frozen=('embed', 'blocks/0')"]
    start = loop.run(kestrel_nano_tiny.config(), tmp_path / "a", ["steps=1", "optimizer.learning_rate=0"],
                     report=lambda _: None).params
    end = loop.run(kestrel_nano_tiny.config(), tmp_path / "b", overrides, report=lambda _: None).params
    for key in ("embed",):
        np.testing.assert_array_equal(np.asarray(jax.tree.leaves(end[key])[0]),
                                      np.asarray(jax.tree.leaves(start[key])[0]))
    for a, b in zip(jax.tree.leaves(end["blocks"][0]), jax.tree.leaves(start["blocks"][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(end["blocks"][1]), jax.tree.leaves(start["blocks"][1]))]
    assert any(moved), "the parameters not frozen trained"
