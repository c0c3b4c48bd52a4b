"""Teaches the vision tower to see characters before the language model reads through it.

Trained only through the language model, kestrel-nano's tower learned nothing in a 60-minute CPU
run (its soft tokens collapsed to one vector; ``bench/results/nano_vision_probe.json``): each
picture is a few hundred tokens of text whose loss hangs on the reading through many steps, and
the gradient reaches the patches only through the model's softmax reading of them. Here every soft
token gets its own target instead: the characters whose ink centres lie in its cell of the
picture, in drawing order, as up to ``slots`` classifications (then a stop class), from a linear
head on the soft tokens. The pictures are the vision tasks' own (``IMAGE_TASKS``: problem text,
tables, bar charts, triangles, the reading drill), which record each character's ink centre
(``Figure.glyphs``), so the tower learns on exactly what the model will be shown; every step draws
fresh pictures of the train split, and the accuracy reported is on held-out pictures (the other
split's words and names, other seeds).

The result is a Kestrel checkpoint folder: a text model's parameters (``--base``, e.g. the bundled
kestrel-nano) with the pretrained tower beside them, in the run config's architecture, so the
language model's training starts from both::

    python -m train.tower_pretrain --config configs/nano_vision.py --base checkpoints/kestrel-nano \\
        --out runs/tower --steps 600
    kestrel train --config configs/nano_vision.py --set init_from=runs/tower --workdir runs/nano_vision

A per-patch character objective is how OCR-heavy vision encoders are commonly pretrained before
they are joined to a language model (Pix2Struct, Donut); it is the tower-side half of that recipe,
sized for a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import time

import numpy as np

from kestrel.errors import KestrelError

# Class 0 ends a cell's reading (no more characters), 1 is any character outside printable ASCII,
# then one class per printable non-space ASCII character.
STOP, OTHER = 0, 1
CHARSET = "".join(chr(c) for c in range(33, 127))
NUM_CLASSES = 2 + len(CHARSET)
_CLASS = {ch: 2 + i for i, ch in enumerate(CHARSET)}


def char_class(ch: str) -> int:
    return _CLASS.get(ch, OTHER)


def cell_targets(glyphs: list, size: tuple[int, int], side: int, slots: int) -> tuple[np.ndarray, int]:
    """The per-cell targets of one picture.

    Args:
      glyphs: ``(char, x, y)`` ink centres on the picture (``Figure.glyphs``), in drawing order.
      size: the picture's (width, height) before it is resized to the tower's square.
      side: soft tokens per side (the tower's ``mm_tokens_per_image`` is ``side ** 2``); cell
        ``r * side + c`` is row r, column c, as the soft tokens are ordered.
      slots: characters read per cell; a cell's slots after its last character hold ``STOP``.

    Returns:
      (int32 [side * side, slots] classes, how many characters did not fit their cell's slots).
    """
    w, h = size
    targets = np.zeros((side * side, slots), np.int32)
    filled = np.zeros(side * side, np.int64)
    lost = 0
    for ch, x, y in glyphs:
        r = min(side - 1, max(0, int(y * side / h)))
        c = min(side - 1, max(0, int(x * side / w)))
        k = r * side + c
        if filled[k] < slots:
            targets[k, filled[k]] = char_class(ch)
            filled[k] += 1
        else:
            lost += 1
    return targets, lost


def scored_slots(targets: np.ndarray) -> np.ndarray:
    """Which slots count: every character and the first ``STOP`` after a cell's last character."""
    is_char = targets != STOP
    first_stop = np.cumsum(~is_char, axis=-1) == 1
    return is_char | (first_stop & ~is_char)


def picture_batch(rng: random.Random, n: int, split: str, vision, slots: int) -> dict:
    """`n` pictures of the vision tasks (uniform over tasks and levels 1-5), ready for the tower."""
    from model.image_processing import load_image
    from train.synthetic.registry import IMAGE_TASKS, generate

    side = math.isqrt(vision.mm_tokens_per_image)
    pixels, targets, lost = [], [], 0
    for _ in range(n):
        ex = generate(rng.choice(IMAGE_TASKS), level=rng.randint(1, 5), rng=rng, split=split)
        figure = ex.meta["figure"]
        t, dropped = cell_targets(figure["glyphs"], tuple(figure["size"]), side, slots)
        pixels.append(load_image(ex.images[0], vision))
        targets.append(t)
        lost += dropped
    targets = np.stack(targets)
    return {"pixels": np.stack(pixels), "targets": targets, "mask": scored_slots(targets), "lost": lost}


def build_reader(vision, width: int, slots: int, seed: int):
    """The tower (soft tokens of `width`) and a linear head reading `slots` classes per soft token."""
    import jax.numpy as jnp
    from flax import nnx

    from model.vision import VisionTower

    class TowerReader(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.tower = VisionTower(vision, width, dtype="float32", param_dtype="float32", rngs=rngs)
            self.head = nnx.Linear(width, slots * NUM_CLASSES, rngs=rngs)

        def __call__(self, pixels):
            soft = self.tower(pixels, "xla")  # [B, M, D]
            logits = self.head(soft)
            return logits.reshape(*soft.shape[:2], slots, NUM_CLASSES).astype(jnp.float32)

    return TowerReader(nnx.Rngs(seed))


def scores(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
    """Character accuracy (slots holding a character), and cells read exactly (every scored slot
    right) among cells with ink."""
    right = np.argmax(logits, -1) == targets
    is_char = targets != STOP
    inked = is_char.any(-1)
    cell_ok = np.where(mask, right, True).all(-1)
    return {"char_accuracy": float(right[is_char].mean()) if is_char.any() else 0.0,
            "cell_exact": float(cell_ok[inked].mean()) if inked.any() else 0.0,
            "chars": int(is_char.sum())}


HEAD_FILE, RECORD_FILE = "reader_head.npz", "tower_pretraining.json"


def load_reader(reader, folder: str | pathlib.Path, report=print) -> None:
    """Sets `reader`'s tower to the vision tower of the checkpoint `folder` (an earlier ``--out``
    or any Kestrel checkpoint with a tower of this shape), and its head to the folder's
    ``reader_head.npz`` when it has one (an earlier ``--out``), to train on.

    Raises:
      KestrelError: the folder is not a checkpoint, has no tower of this shape, or has a head of
        another shape (another ``--slots``).
    """
    from flax import nnx

    from model.checkpoint import flatten_params, nest_params, restore_params

    folder = pathlib.Path(folder)
    stored = {k[len("vision/"):]: v for k, v in flatten_params(restore_params(folder)).items()
              if k.startswith("vision/")}
    parts = [(reader.tower, stored)]
    if (folder / HEAD_FILE).is_file():
        parts.append((reader.head, dict(np.load(folder / HEAD_FILE))))
    else:
        report(f"{folder} has no {HEAD_FILE}: the reading head starts fresh")
    for part, values in parts:
        state = nnx.state(part, nnx.Param)
        want = flatten_params(nnx.to_pure_dict(state))
        wrong = sorted(set(want) ^ set(values)) + [k for k in want if k in values
                                                   and tuple(values[k].shape) != tuple(want[k].shape)]
        if wrong:
            raise KestrelError(f"--start-from {str(folder)!r} does not fit this tower and head "
                               f"(--slots and the config's tower must match): {', '.join(wrong[:4])}")
        nnx.replace_by_pure_dict(state, nest_params({k: np.asarray(v) for k, v in values.items()},
                                                    nnx.to_pure_dict(state)))
        nnx.update(part, state)


def save_head(reader, folder: str | pathlib.Path) -> None:
    from flax import nnx

    from model.checkpoint import flatten_params

    flat = flatten_params(nnx.to_pure_dict(nnx.state(reader.head, nnx.Param)))
    np.savez(pathlib.Path(folder) / HEAD_FILE, **{k: np.asarray(v) for k, v in flat.items()})


def pretrain(vision, width: int, *, steps: int, batch: int, lr: float, slots: int, seed: int,
             eval_pictures: int, start_from: str | pathlib.Path | None = None, log_every: int = 20,
             report=print):
    """Trains the tower with the per-cell reading objective, from scratch or from `start_from`
    (an earlier output folder); returns (the tower and head module, record)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    reader = build_reader(vision, width, slots, seed)
    earlier = 0  # steps the tower has already trained: a continuation draws pictures it has not seen
    if start_from is not None:
        load_reader(reader, start_from, report)
        if (pathlib.Path(start_from) / RECORD_FILE).is_file():
            before = json.loads((pathlib.Path(start_from) / RECORD_FILE).read_text())
            earlier = before.get("total_steps", before.get("steps", 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    optimizer = nnx.Optimizer(reader, optax.chain(optax.clip_by_global_norm(1.0),
                                                  optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)

    def loss_of(logits, targets, mask):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)

    @nnx.jit
    def train_step(reader, optimizer, pixels, targets, mask):
        def loss_fn(reader):
            logits = reader(pixels)
            return loss_of(logits, targets, mask), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(reader)
        optimizer.update(reader, grads)
        is_char = targets != STOP
        right = (jnp.argmax(logits, -1) == targets) & is_char
        return loss, jnp.sum(right) / jnp.maximum(jnp.sum(is_char), 1)

    @nnx.jit
    def predict(reader, pixels):
        return reader(pixels)

    rng = random.Random(seed * 1_000_003 + earlier)
    log, lost, seen, t0 = [], 0, 0, time.perf_counter()
    for i in range(1, steps + 1):
        b = picture_batch(rng, batch, "train", vision, slots)
        lost, seen = lost + b["lost"], seen + int((b["targets"] != STOP).sum()) + b["lost"]
        loss, char_accuracy = train_step(reader, optimizer, jnp.asarray(b["pixels"]), jnp.asarray(b["targets"]),
                          jnp.asarray(b["mask"], jnp.float32))
        if i % log_every == 0 or i == steps:
            log.append({"step": i, "loss": round(float(loss), 4), "char_accuracy": round(float(char_accuracy), 4),
                        "seconds": round(time.perf_counter() - t0, 1)})
            report(f"step {i}/{steps}: loss {float(loss):.3f}, characters {float(char_accuracy):.1%} right "
                   f"({time.perf_counter() - t0:.0f} s)")
    held = random.Random(10_000_019 + seed)
    parts = []
    for start in range(0, eval_pictures, batch):
        b = picture_batch(held, min(batch, eval_pictures - start), "heldout", vision, slots)
        parts.append((np.asarray(predict(reader, jnp.asarray(b["pixels"]))), b["targets"], b["mask"]))
    logits, targets, mask = (np.concatenate(x) for x in zip(*parts))
    heldout = scores(logits, targets, mask)
    report(f"held-out pictures ({eval_pictures}): characters {heldout['char_accuracy']:.1%} right, "
           f"inked cells read exactly {heldout['cell_exact']:.1%}")
    record = {"steps": steps, "total_steps": earlier + steps,
              "start_from": None if start_from is None else str(start_from), "batch": batch,
              "learning_rate": lr, "slots": slots, "seed": seed,
              "seconds": round(time.perf_counter() - t0, 1), "characters_past_slots": lost / max(seen, 1),
              "heldout": {"pictures": eval_pictures, **heldout}, "log": log}
    return reader, record


def merge_into_checkpoint(run_model_cfg, base: str | pathlib.Path, tower, out: str | pathlib.Path,
                          record: dict, force: bool = False) -> pathlib.Path:
    """Writes `out`: `base`'s parameters (and tokenizer) with `tower`'s as the model's vision tower.

    Raises:
      KestrelError: `base` is not a checkpoint, has a vision tower's parameters of its own, or
        does not match the run config's text architecture.
    """
    from flax import nnx

    from model.checkpoint import (abstract_params, flatten_params, load_tokenizer, model_from_params,
                                  restore_params, save_checkpoint)

    cfg = run_model_cfg.replace(dtype="float32", param_dtype="float32")
    want = flatten_params(abstract_params(cfg))
    have = flatten_params(restore_params(base))
    ours = {f"vision/{k}": v for k, v in flatten_params(nnx.to_pure_dict(nnx.state(tower, nnx.Param))).items()}
    problems = [k for k in have if k.startswith("vision/")]
    problems += [f"{k} has shape {tuple(have[k].shape)}, the model's is {tuple(want[k].shape)}" for k in have
                 if k in want and tuple(have[k].shape) != tuple(want[k].shape)]
    problems += [f"{k} (the model lacks it)" for k in have if k not in want]
    problems += [f"{k} (neither the base nor the tower has it)" for k in want if k not in have and k not in ours]
    if problems:
        raise KestrelError(f"--base {str(base)!r} does not fit the run config's model: " + "; ".join(problems[:5]))
    merged = {k: np.asarray(have[k] if k in have else ours[k], np.float32) for k in want}
    model = model_from_params(cfg, merged)
    return save_checkpoint(model, out, tokenizer=load_tokenizer(base), force=force,
                           source={"base": str(pathlib.Path(base).absolute()), "tower_pretraining": record})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run config whose model has the vision tower")
    parser.add_argument("--base", required=True, help="checkpoint folder with the text model's parameters")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (base + pretrained tower)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16, help="pictures per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--slots", type=int, default=6, help="characters read per soft token's cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-pictures", type=int, default=128)
    parser.add_argument("--start-from", help="an earlier --out folder whose tower and head go on training")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run config, as kestrel train does (e.g. model.vision.patch_size=14)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.slots < 1 or args.eval_pictures < 1:
        parser.error("--steps, --batch, --slots and --eval-pictures must be positive")
    from model.checkpoint import read_config
    from train.config import apply_overrides, load_config

    try:
        cfg = apply_overrides(load_config(args.config), args.set)
    except KestrelError as e:
        parser.error(str(e))
    if cfg.model.vision is None:
        parser.error(f"{args.config}'s model has no vision tower")
    if pathlib.Path(args.out).exists() and not args.force:
        parser.error(f"{args.out} exists (pass --force to replace it)")
    for folder in [args.base] + ([args.start_from] if args.start_from else []):
        try:
            read_config(folder)
        except KestrelError as e:
            parser.error(str(e))
    try:
        reader, record = pretrain(cfg.model.vision, cfg.model.hidden_size, steps=args.steps, batch=args.batch,
                                  lr=args.lr, slots=args.slots, seed=args.seed, eval_pictures=args.eval_pictures,
                                  start_from=args.start_from, report=lambda line: print(line, flush=True))
        out = merge_into_checkpoint(cfg.model, args.base, reader.tower, args.out, record, force=args.force)
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_head(reader, out)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
