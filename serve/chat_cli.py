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
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="default and bound of a request's max_output_tokens (default: max-model-len)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens of one sequence, prompt + output (default: the model's context); "
                        "the server refuses to start when one such sequence cannot fit")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages of the global layers (default: max-num-seqs sequences of "
                        "max-model-len, checked against the memory by the planner)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-images", type=int, default=8, help="images per request (models with a vision tower)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="encoded size of one image")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000,
                   help="width x height of one image, checked from its header before decoding")
    from kestrel.cli import add_plan_arguments

    add_plan_arguments(p, serving=True)
    p.add_argument("--early-exit-threshold", type=float, default=None,
                   help="decode with the model's exit heads (config exit_layers): a step stops at an "
                        "exit layer when every row's top probability there exceeds this (0..1); off by default")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="quantize a float checkpoint's weights at load: int8 (weight-only) or "
                        "int8-w8a8 (weights and activations)")
    p.add_argument("--log-level", default="info")
    # Speculative decoding, named after vLLM's speculative_config keys.
    p.add_argument("--speculative", choices=("off", "ngram", "draft"), default="off",
                   help="speculative decoding: prompt lookup (ngram) or a draft model (draft)")
    p.add_argument("--draft-model", default=None,
                   help="draft checkpoint folder for --speculative draft (the target's tokenizer)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts verified per step (k)")
    p.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram matched (ngram)")
    p.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram matched (ngram)")
    p.add_argument("--speculative-min-acceptance", type=float, default=0.1,
                   help="acceptance rate below which speculation is switched off (per request, "
                        "and paused server-wide)")


def speculative_config(args):
    """The engine's SpeculativeConfig from the serve flags (None: off); bad flags raise KestrelError."""
    from model.checkpoint import load_checkpoint
    from serve.speculative import SpeculativeConfig

    if args.speculative == "off":
        if args.draft_model is not None:
            raise KestrelError("--draft-model needs --speculative draft")
        return None
    draft_model = draft_tokenizer = None
    if args.speculative == "draft":
        if args.draft_model is None:
            raise KestrelError("--speculative draft needs --draft-model CKPT")
        if not Path(args.draft_model).is_dir():
            raise KestrelError(f"draft checkpoint folder {args.draft_model!r} does not exist")
        draft_model, draft_tokenizer = load_checkpoint(Path(args.draft_model))
    elif args.draft_model is not None:
        raise KestrelError("--draft-model needs --speculative draft")
    try:
        return SpeculativeConfig(args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                 prompt_lookup_max=args.prompt_lookup_max,
                                 prompt_lookup_min=args.prompt_lookup_min, draft_model=draft_model,
                                 draft_tokenizer=draft_tokenizer,
                                 min_acceptance_rate=args.speculative_min_acceptance)
    except ValueError as e:
        raise KestrelError(str(e)) from None


def plan_pools(args, cfg):
    """(max_model_len, global pages, sliding pages) for ``kestrel serve``, from the memory planner.

    Without ``--num-pages`` the pools hold ``--max-num-seqs`` sequences of ``--max-model-len``
    tokens, and a plan that does not fit the memory is refused with its numbers before any weight
    is loaded (vLLM refuses at start too). With it, the engine checks that one sequence fits.
    """
    from kestrel.cli import plan_arguments
    from serve.memory_plan import describe, plan_memory, verdict

    max_len = args.max_model_len or cfg.max_position_embeddings
    if max_len > cfg.max_position_embeddings:
        raise KestrelError(f"--max-model-len {max_len:,} exceeds the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings:,})")
    if args.max_output_tokens is not None and not 1 <= args.max_output_tokens < max_len:
        raise KestrelError(f"--max-output-tokens must be in [1, {max_len - 1:,}] (below max-model-len), "
                           f"got {args.max_output_tokens}")
    kw = dict(context=max_len, **plan_arguments(args))
    try:
        plan = plan_memory(cfg, **kw)
    except ValueError as e:
        raise KestrelError(str(e)) from None
    pages = {g.kind: g.num_pages for g in plan.groups}
    if args.num_pages is not None:
        return max_len, args.num_pages, pages.get("sliding")
    if not plan.fits:
        raise KestrelError(f"max-model-len {max_len:,} x max-num-seqs {args.max_num_seqs} does not fit "
                           f"the memory:\n{describe(plan, cfg)}\n{verdict(plan, cfg, kw)}")
    return max_len, pages.get("global", pages.get("sliding")), pages.get("sliding")


def build_server(args):
    """The KestrelServer ``serve_main`` runs (split out so tests can build one from arguments)."""
    from model.checkpoint import load_checkpoint, read_config
    from model.quantization import check_kv_cache_dtype, check_quantization
    from serve.api.auth import load_api_keys
    from serve.api.server import KestrelServer, TlsConfig
    from serve.effort import EffortModel
    from model.image_processing import ImageLimits
    from serve.engine import Engine

    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        raise KestrelError(f"checkpoint folder {os.fspath(ckpt)!r} does not exist")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise KestrelError("give both --tls-cert and --tls-key, or neither")
    for flag in ("port", "max_queued", "num_pages", "page_size", "max_num_seqs", "max_num_batched_tokens",
                 "max_model_len", "max_images", "max_image_bytes", "max_image_pixels"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "port" else 1):
            raise KestrelError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.early_exit_threshold is not None and not 0.0 <= args.early_exit_threshold <= 1.0:
        raise KestrelError(f"--early-exit-threshold must be in [0, 1], got {args.early_exit_threshold}")
    check_quantization(args.quantize)
    check_kv_cache_dtype(args.kv_cache_dtype)
    keys = load_api_keys(args.api_keys_file, args.api_keys_env)
    max_len, num_pages, num_sliding_pages = plan_pools(args, read_config(ckpt))
    model, tokenizer = load_checkpoint(ckpt, quantize=args.quantize)
    if args.early_exit_threshold is not None and not model.config.exit_layers:
        raise KestrelError(f"--early-exit-threshold: the model in {os.fspath(ckpt)!r} has no exit heads "
                           "(its config.json has no exit_layers)")
    speculative = speculative_config(args)
    try:  # a draft model with another tokenizer is refused here, before anything is served
        effort = EffortModel.load(ckpt)
        engine = Engine(model, tokenizer, num_pages=num_pages, page_size=args.page_size,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        num_sliding_pages=num_sliding_pages, effort=effort, max_model_len=max_len,
                        kv_cache_dtype=args.kv_cache_dtype, max_images_per_request=args.max_images,
                        image_limits=ImageLimits(max_bytes=args.max_image_bytes,
                                                 max_pixels=args.max_image_pixels),
                        speculative=speculative, early_exit_threshold=args.early_exit_threshold)
    except ValueError as e:
        prefix = f"--speculative {args.speculative}: " if speculative is not None else ""
        raise KestrelError(f"{prefix}{e}") from None
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

    def local_result(self, call_id: str, name: str, output: str) -> None:
        self._enter(f"local{call_id}", None)  # one line per call, even for equal results
        self.out.write(self._style(CYAN, f"[local result] {name}: {output}"))

    def end(self, response=None) -> None:
        self.out.write("\n")
        if response is not None and response.HasField("usage"):
            u = response.usage
            images = f", {u.image_tokens} image" if u.image_tokens else ""
            self.out.write(self._style(DIM, f"[{response.id}] input {u.input_tokens} tokens "
                                            f"({u.cached_input_tokens} cached{images}), reasoning {u.reasoning_tokens}, "
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
                    printer.local_result(c.call_id, c.name, result)
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
