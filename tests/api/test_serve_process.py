"""``serve_main`` as a real process: it serves on the given ports, logs JSON lines, and exits
cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import portpicker

from model.checkpoint import save_checkpoint
from protos.kestrel.v1 import kestrel_pb2 as pb
from protos.kestrel.v1 import kestrel_pb2_grpc as pb_grpc
from tiny_model import build_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import argparse, sys
from serve.chat_cli import add_serve_arguments, serve_main
p = argparse.ArgumentParser(); add_serve_arguments(p)
serve_main(p.parse_args(sys.argv[1:]))
"""


def test_serve_main_serves_and_stops_on_sigterm(tokenizer, tmp_path):
    ckpt = tmp_path / "tiny"
    save_checkpoint(build_model(tokenizer), ckpt, tokenizer=tokenizer)
    port, http_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nsk-process-key\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ckpt), "--port", str(port), "--http-port",
                             str(http_port), "--api-keys-file", str(keys), "--num-pages", "64"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.KestrelStub(channel)
            models = stub.ListModels(pb.ListModelsRequest(), timeout=30,
                                     metadata=(("authorization", "Bearer sk-process-key"),)).models
            assert [m.id for m in models] == ["tiny"]
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
                raise AssertionError("a call without a key went through")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert "serving" in messages and "shutting down" in messages and "stopped" in messages
    serving = next(line for line in lines if line["msg"] == "serving")
    assert serving["grpc"] == f"127.0.0.1:{port}" and serving["auth"] is True
    assert "sk-process-key" not in err
