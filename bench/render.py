"""Cost of rendered problems: examples/s of each image task and packed batches/s, against text peers.

The peer of every image task is the text STEM mix generated in the same run (the image tasks build
the same conversations plus a Pillow picture and its PNG encoding), and the peer of an image batch
is a text batch of the same shape with the same tokenizer. Medians of repeats; the JSON keeps the
ratios, since this machine is shared. Also reports the PNG sizes and the picture sides.

    python bench/render.py [--n 200] [--repeats 3] [--out bench/results/render_cpu.json]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, write_json  # noqa: E402

LEVELS = {lv: 1.0 for lv in (1, 2, 3, 4, 5)}


def examples_per_s(tasks: dict[str, float], n: int, repeats: int) -> tuple[float, list]:
    from train.synthetic import mixture

    rates, examples = [], []
    for r in range(repeats):
        start = time.perf_counter()
        examples = list(mixture(r, LEVELS, n=n, tasks=tasks))
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), examples


def batches_per_s(tokenizer: str, tasks: tuple, steps: int) -> float:
    from train.data import SyntheticBatches, SyntheticDataConfig

    data = SyntheticBatches(SyntheticDataConfig(tokenizer=tokenizer, batch_size=8, seq_len=1024, tasks=tasks))
    data.batch(0)  # loads the tokenizer
    times = []
    for s in range(1, steps + 1):
        start = time.perf_counter()
        data.batch(s)
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from train.synthetic import SUITES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="examples per task and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="batches timed per mix")
    p.add_argument("--tokenizer", default="checkpoints/kestrel-nano")
    p.add_argument("--out", default="bench/results/render_cpu.json")
    args = p.parse_args(argv)

    text_rate, _ = examples_per_s({t: 1.0 for t in SUITES["stem"]}, args.n, args.repeats)
    tasks = {}
    for task in SUITES["vision"]:
        rate, examples = examples_per_s({task: 1.0}, args.n, args.repeats)
        sizes = [len(ex.images[0]) for ex in examples]
        sides = [Image.open(io.BytesIO(ex.images[0])).size for ex in examples]
        tasks[task] = {"examples_per_s": round(rate, 1), "ratio_to_text_stem": round(rate / text_rate, 4),
                       "png_bytes_median": int(statistics.median(sizes)),
                       "side_px_min": min(min(s) for s in sides), "side_px_max": max(max(s) for s in sides)}
        print(task, tasks[task], flush=True)
    text_batches = batches_per_s(args.tokenizer, (("stem", 1.0),), args.steps)
    image_batches = batches_per_s(args.tokenizer, (("vision", 1.0),), args.steps)
    payload = {
        "benchmark": "rendered problems: generation and packing cost against text peers",
        "machine_note": "shared 2-core CPU; compare ratios, not absolute figures",
        "environment": environment(),
        "n_per_repeat": args.n, "repeats": args.repeats,
        "text_stem_examples_per_s": round(text_rate, 1),
        "image_tasks": tasks,
        "batch_8x1024": {"text_stem_batches_per_s": round(text_batches, 3),
                         "vision_batches_per_s": round(image_batches, 3),
                         "ratio_vision_to_text": round(image_batches / text_batches, 4)},
    }
    print(write_json(args.out, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
