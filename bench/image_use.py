"""How much a vision checkpoint uses its pictures: teacher-forced loss on the tokens read off a
picture, with the example's own picture against another example's and a blank one.

A model whose tower conveys nothing scores the same whatever picture it gets (it guesses the read
values from the text alone); one that reads does worse on a swapped picture. This tells "the tower
reads nothing" from "the model reads but then reasons wrongly" without any decoding, in one forward
pass per example, so it runs on a checkpoint in a minute where a ``kestrel eval --suite vision``
needs many.

Beside it, the soft tokens themselves (``soft_tokens``): their mean pairwise cosine over the
examples' pictures (1.0: the tower has collapsed to one output whatever it is shown) and their mean
norm against the text embeddings' (the language model reads both in one residual stream).

Each held-out example (``vision`` and ``reading`` suites, their tasks and levels 1-5 in turn) is
rendered as in training; the scored tokens are the trainable tokens of the reasoning's first line
("The image reads: ...", "The chart shows ..."): the values copied off the picture. For each
example and each picture (``own``; ``swapped``: the next example's; ``blank``: one uniform
mid-grey), the mean negative log-likelihood per scored token and whether each is the argmax.

    python bench/image_use.py CKPT [--n 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import environment, write_json  # noqa: E402

SEED_BASE = 20_000_000  # held-out seeds far from kestrel eval's (which count from 0)
PICTURES = ("own", "swapped", "blank")


def read_line_mask(tokenizer, ids, trainable) -> list[bool]:
    """Which tokens are trainable and hold text of the assistant's first reasoning line (the line
    after ``<think>``; a token that ends the line, like ``".\\n"``, counts when text precedes its
    newline)."""
    think = tokenizer.token_to_id("<think>")
    out = [False] * len(ids)
    first = next((k + 1 for k, tid in enumerate(ids) if trainable[k] and tid == think), len(ids))
    started = False
    for t in range(first, len(ids)):
        piece = tokenizer.decode([int(ids[t])])
        if not started:
            piece = piece.lstrip("\n")  # the newline after <think>
            if not piece.strip():
                continue
            started = True
        text, newline, _ = piece.partition("\n")
        out[t] = bool(text) and bool(trainable[t])
        if newline:
            break
    return out


def measure(ckpt: str, n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model.checkpoint import load_checkpoint
    from model.image_processing import load_image
    from train.image_tokens import expand_images, has_vision_tower, image_token_ids
    from train.packing import tokenize_segments
    from train.synthetic import SUITES, generate, render_kestrel

    model, tokenizer = load_checkpoint(ckpt)
    if not has_vision_tower(model):
        raise SystemExit(f"{ckpt}: the model has no vision tower")
    vision = model.config.vision
    marker, pad = image_token_ids(tokenizer)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(tokens, pixels):
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens, images=pixels)[0], -1)

    tasks = SUITES["vision"] + SUITES["reading"]
    examples = [generate(tasks[i % len(tasks)], level=1 + (i // len(tasks)) % 5, seed=SEED_BASE + i,
                         split="heldout") for i in range(n)]
    blank = np.full((vision.image_size, vision.image_size, vision.num_channels), 0.0, np.float32)
    nll, right, count = collections.defaultdict(float), collections.Counter(), collections.Counter()
    by_task = collections.defaultdict(lambda: collections.defaultdict(float))
    for i, ex in enumerate(examples):
        enc = expand_images(tokenize_segments(tokenizer, render_kestrel(ex)), list(ex.images), marker, pad,
                            vision.mm_tokens_per_image)
        ids = [int(t) for t in enc.ids]
        scored = read_line_mask(tokenizer, ids, enc.trainable)
        length = len(ids) - 1
        width = 1 << max(length - 1, 255).bit_length()  # a few compiled widths, not one per example
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :length] = ids[:-1]
        pictures = {"own": load_image(ex.images[0], vision),
                    "swapped": load_image(examples[(i + 1) % n].images[0], vision), "blank": blank}
        task = ex.meta["task"]
        for name, pixels in pictures.items():
            logp = np.asarray(forward(jnp.asarray(tokens), jnp.asarray(pixels[None])))[0]
            for t in range(length):
                if not scored[t + 1]:
                    continue
                target = ids[t + 1]
                nll[name] += -float(logp[t, target])
                right[name] += int(np.argmax(logp[t]) == target)
                count[name] += 1
                by_task[task][f"{name}_nll"] += -float(logp[t, target])
                by_task[task][f"{name}_tokens"] += 1
    result = {"checkpoint": ckpt, "examples": n, "scored_tokens": count["own"],
              "pictures": {p: {"nll_per_token": nll[p] / count[p], "token_accuracy": right[p] / count[p]}
                           for p in PICTURES},
              "by_task": {t: {p: row[f"{p}_nll"] / row[f"{p}_tokens"] for p in PICTURES}
                          for t, row in sorted(by_task.items())}}
    result["swapped_minus_own_nll"] = (result["pictures"]["swapped"]["nll_per_token"]
                                       - result["pictures"]["own"]["nll_per_token"])
    pixels = np.stack([load_image(ex.images[0], vision) for ex in examples[:16]])
    soft = np.asarray(model.encode_images(jnp.asarray(pixels)), np.float64).reshape(-1, model.config.hidden_size)
    table = np.asarray(model.embed.table[...], np.float64)
    result["soft_tokens"] = {"mean_pairwise_cosine": mean_pairwise_cosine(soft),
                             "mean_norm": float(np.linalg.norm(soft, axis=1).mean()),
                             "text_embedding_mean_norm": float(np.linalg.norm(table, axis=1).mean())}
    return result


def mean_pairwise_cosine(x) -> float:
    """The mean cosine similarity of the rows of `x` [N, D] over distinct pairs."""
    import numpy as np

    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    n = len(x)
    return float((cos.sum() - np.trace(cos)) / (n * (n - 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=40, help="held-out examples (the five picture tasks in turn)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be >= 2 (a swapped picture is another example's)")
    result = measure(args.checkpoint, args.n)
    for name, row in result["pictures"].items():
        print(f"{name:8s} nll/token {row['nll_per_token']:.4f}   token accuracy {row['token_accuracy']:6.1%}")
    print(f"swapped - own: {result['swapped_minus_own_nll']:+.4f} nats per read token "
          f"({result['scored_tokens']} tokens)")
    for task, row in result["by_task"].items():
        print(f"{task:16s} " + "  ".join(f"{p} {v:.3f}" for p, v in row.items()))
    soft = result["soft_tokens"]
    print(f"soft tokens: mean pairwise cosine {soft['mean_pairwise_cosine']:.3f}, mean norm "
          f"{soft['mean_norm']:.2f} (text embeddings {soft['text_embedding_mean_norm']:.2f})")
    if args.json:
        write_json(args.json, {"environment": environment(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
