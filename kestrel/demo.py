"""`make demo`: serve kestrel-nano and talk to it with a scripted `kestrel chat` session.

1. ``kestrel serve checkpoints/kestrel-nano`` starts in its own process on a free local port; the
   demo waits (bounded) for its gRPC health check to say SERVING.
2. A multi-step STEM problem with the built-in calculator: the model reasons, calls the tool,
   the server runs it and the reasoning continues in the same response; a reasoning summary is
   written by a second pass of the model.
3. A request that needs two functions at once, answered by local Python functions
   (``kestrel/demo_functions.py``) that the client runs and sends back.
4. A follow-up turn through ``--previous-response-id``: the earlier turn's tokens come from the
   prefix cache (the usage line shows them as cached).
5. A question about an image, when the checkpoint has a vision tower: one of the generator's
   rendered problems (``train/synthetic/images.py``) is written to a temporary PNG and sent with
   ``kestrel chat --image``. The bundled kestrel-nano has no tower yet; the demo then says in one
   line that it skips this step.
6. SIGTERM: the server stops accepting, drains and exits; the demo reports its exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


CHECKPOINT = os.environ.get("KESTREL_DEMO_CHECKPOINT", "checkpoints/kestrel-nano")
STARTUP_TIMEOUT_S = 300.0
STEM = ("15 batteries cost $8.47 each. Sales tax of 6.5% is added. Priya hands over $500. "
        "What is the change?")
PARALLEL = ("Can you fetch the share quote? Use symbol KSTR. And i need to reserve the train seat, "
            "city Lisbon and date 2026-12-04.")
FOLLOW_UP = "A current of 3.5 A flows through a 163.2 ohm heater. How much power does it use?"
# The rendered problem of the image step: a table drawn as a picture (held-out split, fixed seed).
IMAGE_TASK, IMAGE_LEVEL, IMAGE_SEED = "image_table", 1, 7


def rendered_problem(directory: str) -> tuple[str, str]:
    """One of the generator's problems drawn as an image: (PNG file written in `directory`, the
    question that goes with it, without the image marker ``kestrel chat --image`` adds itself)."""
    from train.synthetic import IMAGE_PLACEHOLDER, generate

    example = generate(IMAGE_TASK, level=IMAGE_LEVEL, seed=IMAGE_SEED, split="heldout")
    path = os.path.join(directory, f"{IMAGE_TASK}.png")
    with open(path, "wb") as f:
        f.write(example.images[0])
    question = next(m["content"] for m in example.messages if m["role"] == "user")
    return path, question.replace(IMAGE_PLACEHOLDER, "").strip()


def image_step(target: str, checkpoint: str) -> None:
    """Asks about a rendered problem if the served checkpoint takes images; else says why not."""
    from model.checkpoint import read_config

    if read_config(checkpoint).vision is None:
        print(f"\n[image question skipped: {checkpoint} has no vision tower (the bundled kestrel-nano "
              "takes no images yet)]", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="kestrel-demo-") as directory:
        path, question = rendered_problem(directory)
        chat(target, question, "--image", path, "--calculator", "--temperature", "0")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Polls the standard health service until SERVING; exits if the server dies or times out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                sys.exit(f"kestrel serve exited with status {server.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    sys.exit(f"kestrel serve did not become healthy within {timeout_s:.0f} s")


def chat(target: str, message: str, *options: str):
    """Runs `kestrel chat` in this process (printed as the command line) and returns the response."""
    from kestrel.cli import build_parser
    from serve.chat_cli import chat as run_chat

    argv = ["chat", "--server", target, *options, message]
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"\n$ kestrel {shown}", flush=True)
    start = time.perf_counter()
    response = run_chat(build_parser().parse_args(argv))
    print(f"  [{time.perf_counter() - start:.1f} s]", flush=True)
    return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    args = parser.parse_args(argv)
    port = free_port()
    target = f"127.0.0.1:{port}"
    print(f"$ kestrel serve {args.checkpoint} --port {port} --http-port -1", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", args.checkpoint,
                               "--port", str(port), "--http-port", "-1", "--log-level", "warning"])
    try:
        start = time.perf_counter()
        wait_serving(target, server, STARTUP_TIMEOUT_S)
        print(f"  [serving after {time.perf_counter() - start:.1f} s]", flush=True)
        chat(target, STEM, "--calculator", "--summary", "concise", "--temperature", "0")
        chat(target, PARALLEL, "--function", "kestrel.demo_functions:fetch_share_quote",
             "--function", "kestrel.demo_functions:reserve_train_seat", "--temperature", "0")
        first = chat(target, "What is 20% of 903?", "--calculator", "--temperature", "0")
        chat(target, FOLLOW_UP, "--calculator", "--previous-response-id", first.id, "--temperature", "0")
        image_step(target, args.checkpoint)
    finally:
        if server.poll() is None:
            print("\n$ kill -TERM <kestrel serve>", flush=True)
            server.send_signal(signal.SIGTERM)
            try:
                status = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                status = server.wait()
            print(f"  [kestrel serve exited with status {status}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
