"""Early exit on CPU: decode speed and greedy agreement of a small model trained with exit heads.

A 6-layer model (D=128) with exit heads after layers 2 and 4 is trained here for 200
steps on ``train.toy_data`` (arithmetic progressions mod V: many easy tokens), with
``early_exit_weight`` 0.5; the same model is also trained without exit heads, to show what the exit
loss costs the final head (held-out cross entropy). Then the engine decodes greedy continuations of
toy-document prefixes at batch 1 and batch 8, with early exit off and at thresholds
0.5 / 0.8 / 0.9 / 0.95 / 1.0. Reported per setting: output tokens/s (warm: every setting runs once
untimed first), its ratio to the same engine without early exit, the share of decode steps that
exited (and where), and greedy agreement with the full model (tokens equal position by position,
and whole continuations equal).

    python bench/early_exit.py [--steps 200] [--out bench/results/early_exit_cpu.json]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import environment, write_json  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import init_model  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.request import SamplingParams  # noqa: E402
from sharding.mesh import MeshConfig  # noqa: E402
from train import loop  # noqa: E402
from train.config import CheckpointConfig, DataConfig, OptimizerConfig, RunConfig  # noqa: E402
from train.loss import cross_entropy, masked_mean  # noqa: E402
from train.toy_data import ToyBatches  # noqa: E402

VOCAB = 256
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=384, max_position_embeddings=512, exit_layers=(2, 4))
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 1.0)
PROMPT_LEN = 12


def train(model_cfg: ModelConfig, exit_weight: float, steps: int):
    cfg = RunConfig(model=model_cfg, name="early_exit_bench", steps=steps, compute_dtype="float32",
                    strategy="dp", early_exit_weight=exit_weight, log_every=steps,
                    mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
                    optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, end_lr_ratio=0.1),
                    data=DataConfig(source="toy", batch_size=4, seq_len=128, seed=0),
                    checkpoint=CheckpointConfig(every_steps=10 * steps, keep=1, async_save=False))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = loop.run(cfg, tmp, devices=jax.devices()[:1], report=lambda *_: None)
        seconds = time.perf_counter() - t0
    model = init_model(model_cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, result.params))
    nnx.update(model, state)
    return model, seconds


def held_out_ce(model, batches: list[dict]) -> dict:
    """Cross entropy of the final head and of each exit head on held-out toy batches."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def ces(state, batch):
        m = nnx.merge(graphdef, state)
        logits, _, exits = m(batch["tokens"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"], return_exits=True)
        mask = batch["loss_mask"]
        return [masked_mean(cross_entropy(lg, batch["targets"])[0], mask) for lg in (logits, *exits)]

    values = np.mean([[float(c) for c in ces(state, {k: jnp.asarray(v) for k, v in b.items()})]
                      for b in batches], axis=0)
    names = ["final"] + [f"exit_after_{e}" for e in model.config.exit_layers]
    return dict(zip(names, (round(float(v), 4) for v in values)))


def prompts(n: int) -> list[list[int]]:
    """Prefixes of held-out toy documents (the batches after the training ones)."""
    out, source = [], ToyBatches(VOCAB, 8, 128, seed=1)
    while len(out) < n:
        b = next(source)
        for row in range(8):
            if (b["segment_ids"][row, :PROMPT_LEN] == 1).all() and len(out) < n:
                out.append([int(t) for t in b["tokens"][row, :PROMPT_LEN]])
    return out


def decode(model, ps, threshold, batch: int, max_tokens: int):
    """(outputs, seconds, exit counts) of a warm engine decoding ps, ``batch`` requests at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engine = Engine(model, None, num_pages=512, page_size=16, max_num_seqs=batch,
                    max_num_batched_tokens=256, early_exit_threshold=threshold)

    def run():
        hs = [engine.submit(EngineRequest(prompt_token_ids=p, channels=False, params=params)) for p in ps]
        t0 = time.perf_counter()
        engine.run_until_idle()
        return [h.output_token_ids for h in hs], time.perf_counter() - t0

    run()  # warm: compiles every shape this workload needs
    engine.runner.exit_counts.clear()
    outs, seconds = run()
    return outs, seconds, dict(engine.runner.exit_counts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="bench/results/early_exit_cpu.json")
    args = ap.parse_args(argv)

    model, train_s = train(MODEL, 0.5, args.steps)
    print(f"trained with exit heads in {train_s:.0f} s", flush=True)
    plain, plain_s = train(MODEL.replace(exit_layers=()), 0.0, args.steps)
    held_out = [ToyBatches(VOCAB, 8, 128, seed=2).batch(i) for i in range(4)]
    quality = {"with_exit_loss": held_out_ce(model, held_out),
               "without_exit_loss": held_out_ce(plain, held_out)["final"]}
    print("held-out cross entropy", quality, flush=True)

    ps = prompts(args.requests)
    rows = []
    for batch in (1, 8):
        full, full_s, _ = decode(model, ps, None, batch, args.max_new_tokens)
        n_tokens = sum(len(o) for o in full)
        base = {"batch": batch, "threshold": None, "tokens_per_s": round(n_tokens / full_s, 1),
                "speed_ratio": 1.0, "token_agreement": 1.0, "sequence_agreement": 1.0}
        rows.append(base)
        print(base, flush=True)
        for threshold in THRESHOLDS:
            outs, s, counts = decode(model, ps, threshold, batch, args.max_new_tokens)
            same = sum(a == b for o, f in zip(outs, full) for a, b in zip(o, f))
            steps = sum(counts.values())
            row = {"batch": batch, "threshold": threshold,
                   "tokens_per_s": round(sum(len(o) for o in outs) / s, 1),
                   "speed_ratio": round(full_s / s * sum(len(o) for o in outs) / n_tokens, 3),
                   "exit_share": {str(k): round(v / steps, 3) for k, v in sorted(counts.items())},
                   "token_agreement": round(same / n_tokens, 4),
                   "sequence_agreement": round(float(np.mean([o == f for o, f in zip(outs, full)])), 4)}
            rows.append(row)
            print(row, flush=True)
    payload = {
        "benchmark": "early_exit",
        "model": {"config": MODEL.to_dict(), "params": MODEL.num_params,
                  "training": {"steps": args.steps, "data": "train.toy_data 4 x 128", "early_exit_weight": 0.5,
                               "seconds_with_exits": round(train_s, 1), "seconds_plain": round(plain_s, 1)}},
        "workload": {"requests": args.requests, "prompt_tokens": PROMPT_LEN,
                     "max_new_tokens": args.max_new_tokens, "greedy": True},
        "held_out_cross_entropy": quality,
        "decode": rows,
        "environment": {**environment(), "note": "shared 2-core CPU, other jobs running"},
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
