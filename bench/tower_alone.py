"""Can a vision tower learn to see digits at all? The tower alone, on the easiest reading there is.

Each picture is one digit 0-9 drawn 120 px tall at a random place on a 224 px canvas, in the
rendered problems' fonts and colours (``train/synthetic/drawing.py``). The tower (kestrel-nano-
vision's by default, ``configs/nano_vision.py``; ``--patch`` and ``--layers`` change it) is trained
from scratch with a linear 10-way head on its soft tokens, pooled by

- ``mean``: their average (how Gemma 3's projector pools patches),
- ``attention``: a softmax over them with one learned query (what a language model's attention
  does with them at best),
- ``max``: their per-feature maximum (every gradient reaches the patch that carries the most),

and every step is a fresh batch, so the accuracy logged is on pictures never seen. A tower that
cannot reach far above chance (10%) here in a few hundred steps will not learn to read a rendered
problem inside a 60-minute run, where it sees a few thousand pictures in all: this finds that out
in two minutes, before the run.

    python bench/tower_alone.py [--pool attention] [--steps 300] [--patch 28] [--layers 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, write_json  # noqa: E402

POOLS = ("mean", "attention", "max")


def digit_picture(rng: random.Random) -> tuple[bytes, int]:
    """PNG bytes of one digit drawn large at a random place, and the digit."""
    from PIL import Image

    from train.synthetic.drawing import colours, paste, png_bytes, random_style, style_rng, text_layer

    digit = rng.randrange(10)
    looks = style_rng(rng)
    background, ink = colours(looks)
    layer = text_layer(str(digit), random_style(looks, ink, 120, 0.0), 400)
    canvas = Image.new("RGB", (224, 224), background)
    paste(canvas, layer, (looks.randint(0, max(0, 224 - layer.width)), looks.randint(0, max(0, 224 - layer.height))))
    return png_bytes(canvas), digit


def measure(pool: str, steps: int, patch: int, layers: int, lr: float, batch: int, seed: int,
            log_every: int = 10) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from configs.nano_vision import vision_tower
    from model.image_processing import load_image
    from model.vision import VisionTower

    cfg = dataclasses.replace(vision_tower(), patch_size=patch, num_layers=layers)
    width = 256  # kestrel-nano's: the soft tokens' width

    class Probe(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.tower = VisionTower(cfg, width, dtype="float32", param_dtype="float32", rngs=rngs)
            self.query = nnx.Param(jax.random.normal(rngs.params(), (width,)) * 0.02)
            self.keys = nnx.Linear(width, width, rngs=rngs)
            self.head = nnx.Linear(width, 10, rngs=rngs)

        def __call__(self, pixels):
            soft = self.tower(pixels, "xla")  # [B, M, D]
            if pool == "mean":
                return self.head(soft.mean(1))
            if pool == "max":
                return self.head(soft.max(1))
            unit = soft * jax.lax.rsqrt(jnp.mean(soft ** 2, -1, keepdims=True) + 1e-6)
            weights = jax.nn.softmax(self.keys(unit) @ self.query[...], axis=-1)  # [B, M]
            return self.head(jnp.einsum("bm,bmd->bd", weights, unit))

    probe = Probe(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(probe, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(probe, optimizer, pixels, labels):
        def loss_fn(probe):
            logits = probe(pixels)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(probe)
        optimizer.update(probe, grads)
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    rng = random.Random(seed)
    log, t0 = [], time.perf_counter()
    for i in range(1, steps + 1):
        pictures = [digit_picture(rng) for _ in range(batch)]
        pixels = jnp.asarray(np.stack([load_image(png, cfg) for png, _ in pictures]))
        labels = jnp.asarray([d for _, d in pictures])
        loss, accuracy = step(probe, optimizer, pixels, labels)
        if i % log_every == 0:
            log.append({"step": i, "loss": round(float(loss), 4), "accuracy": float(accuracy)})
            print(f"step {i}: loss {float(loss):.3f}, accuracy {float(accuracy):.0%} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    last = log[-10:]
    return {"pool": pool, "steps": steps, "batch": batch, "learning_rate": lr, "patch_size": patch, "layers": layers,
            "seconds": round(time.perf_counter() - t0, 1), "chance": 0.1,
            "accuracy_last_10_logs": sum(r["accuracy"] for r in last) / len(last),
            "loss_last_10_logs": sum(r["loss"] for r in last) / len(last), "log": log}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", choices=POOLS, default="attention")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--patch", type=int, default=28, help="patch size in pixels (224 must be a multiple)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.batch < 1 or 224 % args.patch:
        parser.error("--steps must be >= 10, --batch >= 1, and --patch must divide 224")
    result = measure(args.pool, args.steps, args.patch, args.layers, args.lr, args.batch, args.seed)
    print(f"{args.pool} pooling: accuracy {result['accuracy_last_10_logs']:.1%} over the last 10 logged steps "
          f"(chance 10%)")
    if args.json:
        write_json(args.json, {"environment": environment(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
