"""``kestrel serve`` and ``kestrel chat``: the server's command line and a streaming terminal client.

The lead wires these into ``kestrel/cli.py``::

    add_serve_arguments(sub.add_parser("serve")); ... serve_main(args)
    add_chat_arguments(sub.add_parser("chat"));   ... chat_main(args)

``kestrel chat`` shows the reasoning dimmed, each tool call and its result, and the answer as they
stream, then one line with the response id and its token usage (cached input included);
``--function file.py:name`` (or ``module:name``) registers a local Python function as a tool,
which the client runs when the model calls it and sends the result back;
``--previous-response-id`` continues a stored conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

from kestrel.errors import KestrelError

DEFAULT_CHECKPOINT = "checkpoints/kestrel-nano"
DIM, BOLD, CYAN, RED, RESET = "\x1b[2m", "\x1b[1m", "\x1b[36m", "\x1b[31m", "\x1b[0m"


# ------------------------------------------------------------------------------ serve

def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", nargs="?", default=DEFAULT_CHECKPOINT, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free one)")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port; -1 disables it")
    p.add_argument("--model-id", default=None, help="the id clients name (default: the checkpoint folder's name)")
    p.add_argument("--api-keys-file", default=None, help="file with accepted API keys, one per line")
    p.add_argument("--api-keys-env", default=None, help="environment variable with comma-separated API keys")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: TLS on the gRPC port)")
    p.add_argument("--tls-key", default=None)
    p.add_argument("--grace", type=float, default=10.0, help="seconds open streams get to finish on SIGTERM")
    p.add_argument("--max-queued", type=int, default=256, help="open responses before RESOURCE_EXHAUSTED")
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="quantize a float checkpoint's weights at load: int8 (weight-only) or "
                        "int8-w8a8 (weights and activations)")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                   help="KV cache pages: auto (the model's dtype) or int8 (per-page scales)")
    p.add_argument("--log-level", default="info")


def build_server(args):
    """The KestrelServer ``serve_main`` runs (split out so tests can build one from arguments)."""
    from model.checkpoint import load_checkpoint
    from model.quantization import check_kv_cache_dtype, check_quantization
    from serve.api.auth import load_api_keys
    from serve.api.server import KestrelServer, TlsConfig
    from serve.effort import EffortModel
    from serve.engine import Engine

    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise KestrelError(f"checkpoint folder {os.fspath(ckpt)!r} does not exist")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise KestrelError("give both --tls-cert and --tls-key, or neither")
    for flag in ("port", "max_queued", "num_pages", "page_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise KestrelError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    check_quantization(args.quantize)
    check_kv_cache_dtype(args.kv_cache_dtype)
    keys = load_api_keys(args.api_keys_file, args.api_keys_env)
    model, tokenizer = load_checkpoint(ckpt, quantize=args.quantize)
    try:
        effort = EffortModel.load(ckpt)
    except ValueError as e:
        raise KestrelError(str(e)) from None
    engine = Engine(model, tokenizer, num_pages=args.num_pages, page_size=args.page_size,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    effort=effort, kv_cache_dtype=args.kv_cache_dtype)
    tls = TlsConfig(args.tls_cert, args.tls_key) if args.tls_cert else None
    return KestrelServer(engine, model_id=args.model_id or ckpt.resolve().name, api_keys=keys, tls=tls,
                         max_queued=args.max_queued, max_output_tokens=args.max_output_tokens)


def serve_main(args) -> None:
    from serve.api.logs import configure_logging
    from serve.api.server import serve_forever

    configure_logging(args.log_level)
    server = build_server(args)
    http_port = None if args.http_port < 0 else args.http_port
    asyncio.run(serve_forever(server, host=args.host, port=args.port, http_port=http_port, grace=args.grace))


# ------------------------------------------------------------------------------- chat

def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("message", help="what to ask")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--image", action="append", default=[], help="an image file to send (repeatable)")
    p.add_argument("--effort", choices=("none", "low", "medium", "high", "auto"), default=None)
    p.add_argument("--summary", choices=("none", "auto", "concise", "detailed"), default=None)
    p.add_argument("--system", default="", help="instructions placed before the message")
    p.add_argument("--calculator", action="store_true", help="offer the built-in calculator tool")
    p.add_argument("--python", action="store_true", help="offer the built-in python tool")
    p.add_argument("--function", action="append", default=[], metavar="FILE.py:NAME|MODULE:NAME",
                   help="a local Python function the model may call (repeatable)")
    p.add_argument("--tool-choice", default=None, help="none, auto, required or a function name")
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--previous-response-id", default="", help="continue this stored response")
    p.add_argument("--model", default="")
    p.add_argument("--api-key-env", default="KESTREL_API_KEY", help="environment variable holding the API key")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--no-color", action="store_true")


def load_function(spec: str) -> Callable:
    """``file.py:name`` or ``package.module:name`` -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise KestrelError(f"--function takes FILE.py:NAME or MODULE:NAME, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise KestrelError(f"--function: file {where!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise KestrelError(f"--function: cannot import {where!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise KestrelError(f"--function: {where!r} has no function {name!r}")
    return fn


class _Printer:
    """Writes the events of a stream to a terminal as they come."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.section: str | None = None

    def _style(self, style: str, text: str) -> str:
        return f"{style}{text}{RESET}" if self.color else text

    def _enter(self, section: str, header: str | None) -> None:
        if self.section != section:
            if self.section is not None:
                self.out.write("\n")
            if header:
                self.out.write(self._style(BOLD, header) + "\n")
            self.section = section

    def __call__(self, e) -> None:
        kind = e.WhichOneof("event")
        x = getattr(e, kind)
        if kind == "reasoning_text_delta":
            self._enter("reasoning", "[reasoning]")
            self.out.write(self._style(DIM, x.delta))
        elif kind == "reasoning_summary_text_done":
            self._enter("summary", "[summary]")
            self.out.write(self._style(DIM, x.text))
        elif kind == "output_text_delta":
            self._enter("answer", "[answer]")
            self.out.write(x.delta)
        elif kind == "function_call_arguments_done":
            self._enter(f"call{x.call_id}", None)
            self.out.write(self._style(CYAN, f"[call] {x.name}({x.arguments})"))
        elif kind == "tool_execution_finished":
            self._enter(f"result{x.call_id}", None)
            label = "[error]" if x.is_error else "[result]"
            self.out.write(self._style(RED if x.is_error else CYAN, f"{label} {x.name}: {x.output}"))
        elif kind == "incomplete":
            from protos.kestrel.v1 import kestrel_pb2 as pb
            self._enter("end", None)
            self.out.write(self._style(RED, f"[incomplete: {pb.IncompleteReason.Name(x.reason)}]"))
        elif kind == "failed":
            self._enter("end", None)
            self.out.write(self._style(RED, f"[failed: {x.error.message}]"))
        self.out.flush()

    def local_result(self, name: str, output: str) -> None:
        self._enter(f"local{name}{output}", None)
        self.out.write(self._style(CYAN, f"[local result] {name}: {output}"))

    def end(self, response=None) -> None:
        self.out.write("\n")
        if response is not None and response.HasField("usage"):
            u = response.usage
            self.out.write(self._style(DIM, f"[{response.id}] input {u.input_tokens} tokens "
                                            f"({u.cached_input_tokens} cached), reasoning {u.reasoning_tokens}, "
                                            f"output {u.output_tokens}") + "\n")
        self.out.flush()


def chat_main(args, out: TextIO | None = None) -> int:
    """Sends one message and streams the response; returns the exit status (0: completed)."""
    from protos.kestrel.v1 import kestrel_pb2 as pb

    return 0 if chat(args, out).status == pb.RESPONSE_STATUS_COMPLETED else 1


def chat(args, out: TextIO | None = None):
    """`chat_main`'s work: streams the response (and local function rounds); returns the last one."""
    import grpc

    from protos.kestrel.v1 import kestrel_pb2 as pb
    from serve.client import (Client, build_request, calculator, call_local, collect_response, function_calls,
                              function_tool, python_tool)

    out = out or sys.stdout
    functions = {}
    tools = []
    for spec in args.function:
        fn = load_function(spec)
        try:
            tools.append(function_tool(fn))
        except ValueError as e:
            raise KestrelError(str(e)) from None
        functions[fn.__name__] = fn
    if args.calculator:
        tools.append(calculator())
    if args.python:
        tools.append(python_tool())
    for path in args.image:
        if not Path(path).is_file():
            raise KestrelError(f"--image: file {path!r} does not exist")
    request = build_request(args.message, model=args.model, instructions=args.system, tools=tools,
                            tool_choice=args.tool_choice, effort=args.effort, summary=args.summary,
                            max_output_tokens=args.max_output_tokens, temperature=args.temperature,
                            seed=args.seed, previous_response_id=args.previous_response_id,
                            images=args.image)
    printer = _Printer(out, color=not args.no_color and out.isatty())
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    try:
        with Client(args.server, api_key=api_key, tls=args.tls, timeout=args.timeout) as client:
            for _ in range(8):
                final = collect_response(client.stream(request), on_event=printer)
                calls = function_calls(final)
                if not calls or final.status != pb.RESPONSE_STATUS_COMPLETED:
                    break
                outputs = []
                for c in calls:
                    result = call_local(functions, c)
                    printer.local_result(c.name, result)
                    outputs.append(pb.InputItem(function_call_output=pb.FunctionCallOutput(
                        call_id=c.call_id, output=result)))
                follow = pb.CreateRequest(model=args.model, input=outputs, tools=tools,
                                          reasoning=request.reasoning, previous_response_id=final.id,
                                          sampling=request.sampling)
                if request.HasField("max_output_tokens"):
                    follow.max_output_tokens = request.max_output_tokens
                request = follow
    except grpc.RpcError as e:
        raise KestrelError(f"{args.server}: {e.code().name}: {e.details()}") from None
    printer.end(final)
    return final
