"""Needle retrieval through the serving engine, on a two-layer model whose weights are set by hand.

No model trainable on a 2-core CPU retrieves across 200K tokens, so this check configures one: an
induction circuit in the layout of ``configs/long_context.py`` (a sliding layer, then a global one
with YaRN positions), written into an ordinary Kestrel ``Transformer``:

- the residual stream [D = 3V] holds the current token one-hot in [0, V), the previous token in
  [V, 2V) and the retrieved token in [2V, 3V);
- layer 0, sliding (window 2), is a previous-token head: constant query and key biases on the
  1-rad/position RoPE pair, rotated so the score peaks one position back (``A^2 cos(d - 1)``);
  its values copy the token one-hot into [V, 2V);
- layer 1, global, matches the current token against each position's previous token: key tokens
  get orthonormal codes on the lowest-frequency RoPE pairs (after YaRN under 0.1 rad of rotation
  over 200K positions, so position barely disturbs the match), every other token the zero code;
  the value is the attended position's token, written to [2V, 3V), which ``lm_head`` reads.

A prompt ``filler ... KEY VALUE filler ... KEY`` must then decode ``VALUE``. What this measures is
the serving stack, not a model's skill: chunked prefill, paged global K/V, sliding tables that
start past page 0 and YaRN positions carrying one token's identity intact from far back. Limits:
keys are single tokens from a codebook of ``NUM_KEYS``; the match decays as ``cos(d f)`` of the
code pairs' frequencies f, which stays above 0.99 to 262K positions; random-weight or trained
models are not tested for retrieval here.

    python bench/needle.py [--contexts 1000,10000,50000,200000] [--out bench/results/needle_cpu.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

V = 64
NUM_KEYS = 12
FILLER = range(0, 40)  # haystack tokens
KEYS = range(40, 40 + NUM_KEYS)
VALUES = range(52, 64)
H = 64  # head dim: 32 RoPE pairs; pair i turns at inv_freq_i radians per position


def needle_config():
    from model.config import ModelConfig, RopeScaling

    return ModelConfig(vocab_size=V, hidden_size=3 * V, num_layers=2, num_heads=1, num_kv_heads=1,
                       head_dim=H, intermediate_size=8, attention_bias=True, query_scale=1.0,
                       norm_eps=1e-6, rope_theta=1_000_000.0,
                       rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_position_embeddings=8192),
                       rope_local_theta=10_000.0, layer_types=("sliding", "global"), sliding_window=2,
                       max_position_embeddings=262_144, tie_embeddings=False)


@functools.lru_cache(maxsize=None)
def needle_model(prev_strength: float = 8.0, match_strength: float = 7.0):
    """The hand-set model; see the module docstring. Strengths are the query/key norms A and B."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from model.transformer import init_model

    cfg = needle_config()
    model = init_model(cfg)
    d = cfg.hidden_size
    eye = np.eye(V, dtype=np.float32)
    # RMSNorm scales a residual of u unit one-hots by sqrt(D / u).
    norm1, norm2 = np.sqrt(d / 1), np.sqrt(d / 2)

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    embed = zeros(V, d)
    embed[:, :V] = eye
    model.embed.table[...] = jnp.asarray(embed)
    half = H // 2
    for block in model.blocks:
        block.mlp.down[...] = jnp.zeros_like(block.mlp.down[...])
    # Layer 0: previous-token head on RoPE pair 0 (1 rad per position at any base).
    a0 = model.blocks[0].attn
    q_b, k_b = zeros(1, H), zeros(1, H)
    k_b[0, 0] = prev_strength
    q_b[0, 0], q_b[0, half] = prev_strength * np.cos(1.0), -prev_strength * np.sin(1.0)
    a0.q_proj[...] = jnp.zeros_like(a0.q_proj[...])
    a0.k_proj[...] = jnp.zeros_like(a0.k_proj[...])
    a0.q_bias[...], a0.k_bias[...] = jnp.asarray(q_b), jnp.asarray(k_b)
    a0.v_bias[...] = jnp.zeros_like(a0.v_bias[...])
    v0 = zeros(d, 1, H)
    v0[:V, 0, :V] = eye / norm1
    a0.v_proj[...] = jnp.asarray(v0)
    o0 = zeros(1, H, d)
    o0[0, :V, V:2 * V] = eye
    a0.o_proj[...] = jnp.asarray(o0)
    # Layer 1: key codes on the lowest-frequency pairs (dims i and i + H/2 of pairs 26..31).
    dims = [i for p in range(half - NUM_KEYS // 2, half) for i in (p, p + half)]
    a1 = model.blocks[1].attn
    wq, wk = zeros(d, 1, H), zeros(d, 1, H)
    for j, key in enumerate(KEYS):
        wq[key, 0, dims[j]] = match_strength / norm2  # current token is this key
        wk[V + key, 0, dims[j]] = match_strength / norm2  # previous token is this key
    a1.q_proj[...], a1.k_proj[...] = jnp.asarray(wq), jnp.asarray(wk)
    for bias in (a1.q_bias, a1.k_bias, a1.v_bias):
        bias[...] = jnp.zeros_like(bias[...])
    v1 = zeros(d, 1, H)
    v1[:V, 0, :V] = eye / norm2
    a1.v_proj[...] = jnp.asarray(v1)
    o1 = zeros(1, H, d)
    o1[0, :V, 2 * V:] = eye
    a1.o_proj[...] = jnp.asarray(o1)
    head = zeros(V, d)
    head[:, 2 * V:] = eye
    model.lm_head[...] = jnp.asarray(head)
    return model


def haystack(context: int, needles: dict[int, tuple[int, int]], seed: int = 0) -> list[int]:
    """``context`` filler tokens with (key, value) pairs written at the given positions."""
    import numpy as np

    tokens = np.random.default_rng(seed).choice(list(FILLER), size=context).tolist()
    for pos, (key, value) in needles.items():
        tokens[pos], tokens[pos + 1] = key, value
    return tokens


def retrieve(context: int, depths=(0.0, 0.5, 0.9), *, page_size: int = 64, chunk: int = 256,
             seed: int = 0) -> dict:
    """Hides one needle per depth in ``context`` tokens, asks for each through one engine (the
    haystack is prefilled once; later questions hit the prefix cache) and reports what came back."""
    import numpy as np

    from serve.engine import Engine, EngineRequest
    from serve.memory_plan import plan_memory
    from serve.request import SamplingParams

    model = needle_model()
    rng = np.random.default_rng(seed)
    keys = rng.choice(list(KEYS), size=len(depths), replace=False).tolist()
    values = rng.choice(list(VALUES), size=len(depths), replace=False).tolist()
    # Not at position 0: with no token before it, the first token is its own "previous token" (a
    # real prompt starts with BOS or a system turn).
    needles = {min(max(1, int(dep * context)), context - 3): (k, v) for dep, k, v in zip(depths, keys, values)}
    tokens = haystack(context, needles, seed)
    plan = plan_memory(model.config, context=context + 2, batch=1, max_output=1, page_size=page_size,
                       prefill_chunk=chunk)
    pools = {g.kind: g.num_pages for g in plan.groups}
    engine = Engine(model, None, num_pages=pools["global"], num_sliding_pages=pools["sliding"],
                    page_size=page_size, max_num_seqs=1, max_num_batched_tokens=chunk,
                    max_model_len=context + 2)
    answers = []
    t0 = time.perf_counter()
    for pos, (key, value) in sorted(needles.items()):
        handle = engine.submit(EngineRequest(prompt_token_ids=tokens + [key], channels=False,
                                             params=SamplingParams(max_tokens=1, temperature=0.0)))
        while not handle.finished:
            engine.step()
        answers.append({"position": pos, "distance": context - pos, "key": key, "value": value,
                        "answer": handle.output_token_ids[0]})
    return {"context": context, "found": sum(a["answer"] == a["value"] for a in answers),
            "asked": len(answers), "seconds": round(time.perf_counter() - t0, 2), "needles": answers}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1000,10000,50000,200000")
    parser.add_argument("--out", default=str(ROOT / "bench/results/needle_cpu.json"))
    args = parser.parse_args(argv)
    from bench.common import environment, write_json

    results = []
    for c in [int(x) for x in args.contexts.split(",") if x]:
        results.append(retrieve(c))
        print(json.dumps(results[-1]), flush=True)
    write_json(args.out, {"benchmark": "needle", "machine": "shared 2-core CPU",
                          "model": "hand-set induction circuit (bench/needle.py), not trained",
                          "results": results, "environment": environment()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
