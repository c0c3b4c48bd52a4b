"""The ``kestrel`` command: one console script, one subcommand per job.

Each subcommand imports what it needs lazily, so ``kestrel --help`` stays instant, and every
``KestrelError`` becomes a one-line ``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from kestrel.errors import KestrelError


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise KestrelError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise KestrelError(f"{flag} is empty")
    return ids


def cmd_convert(args) -> None:
    from model.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, dtype=args.dtype, force=args.force,
                             quantize=args.quantize)
    print(f"wrote {out}")


def cmd_export(args) -> None:
    from model.convert import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, force=args.force)
    print(f"wrote {out}")


def load_for_inference(path: str):
    from model.checkpoint import load_checkpoint
    from model.generate import Generator

    model, tokenizer = load_checkpoint(path)
    return Generator(model), tokenizer


def prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids, "--prompt-ids")
    if args.prompt is None:
        raise KestrelError("give --prompt TEXT or --prompt-ids 1,2,3")
    if tokenizer is None:
        raise KestrelError("this checkpoint has no tokenizer: use --prompt-ids")
    if args.chat:
        if tokenizer.chat_template is None:
            raise KestrelError("this checkpoint has no chat template: drop --chat")
        text = tokenizer.chat_template.render([{"role": "user", "content": args.prompt}],
                                              add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(args.prompt, add_special_tokens=True)


def cmd_generate(args) -> None:
    from model.generate import GenerationConfig

    generator, tokenizer = load_for_inference(args.ckpt)
    ids = prompt_ids(args, tokenizer)
    stop = tuple(sorted(tokenizer.stop_ids)) if tokenizer is not None else ()
    gen = GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop)
    result = generator.generate([ids], gen)[0]
    text = tokenizer.decode(result.token_ids, skip_special_tokens=not args.json) if tokenizer else ""
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "logprobs": result.logprobs, "text": text}))
    else:
        print(text)


def cmd_score(args) -> None:
    generator, tokenizer = load_for_inference(args.ckpt)
    ids = parse_ids(args.ids, "--ids")
    result = generator.score(ids)
    text = tokenizer.decode(result.token_ids) if tokenizer is not None else ""
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "logprobs": result.logprobs, "text": text}))
    else:
        for tok, pred, lp in zip(ids[1:], result.token_ids, result.logprobs):
            print(f"{tok}\t{lp:.6f}\t(argmax {pred})")
        print(f"total log-probability {sum(result.logprobs):.6f}")


def cmd_eval(args) -> None:
    from train.eval import run_eval

    run_eval(args.ckpt, args.suite, n=args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
             json=args.json, batch_size=args.batch_size, max_rounds=args.max_rounds,
             constrained=args.constrained, effort=args.effort, quantize=args.quantize,
             kv_cache_dtype=args.kv_cache_dtype, early_exit=args.early_exit, decoder=args.decoder)


def read_model_config(path: str):
    """The ModelConfig of a checkpoint folder or of a run config file (``configs/NAME.py``)."""
    from pathlib import Path

    if path.endswith(".py"):
        from train.config import load_config

        return load_config(path).model
    from model.checkpoint import read_config

    if not Path(path).exists():
        raise KestrelError(f"{path!r} is neither a checkpoint folder nor a config file")
    return read_config(path)


def plan_arguments(args) -> dict:
    """``plan_memory`` keyword arguments from ``kestrel plan`` / ``kestrel serve`` flags."""
    from serve.memory_plan import GiB, detect_budget

    if args.memory is not None:
        if not args.memory > 0:
            raise KestrelError(f"--memory must be > 0 GiB, got {args.memory}")
        budget, source = int(args.memory * GiB), "--memory"
    else:
        budget, source = detect_budget()
    return dict(batch=args.max_num_seqs, max_output=args.max_output_tokens, page_size=args.page_size,
                prefill_chunk=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype,
                budget=budget, budget_source=source, utilization=args.memory_utilization)


def add_plan_arguments(p: argparse.ArgumentParser, *, serving: bool) -> None:
    """Flags shared by ``kestrel plan`` and ``kestrel serve`` (vLLM's names where it has them)."""
    if not serving:
        p.add_argument("--context", type=int, required=True,
                       help="most tokens of one sequence, prompt + output (vLLM's max_model_len)")
        p.add_argument("--batch", dest="max_num_seqs", type=int, default=1, help="sequences at once")
        p.add_argument("--max-output", dest="max_output_tokens", type=int, default=None,
                       help="most output tokens of one request (default: half the context)")
        p.add_argument("--page-size", type=int, default=16)
        p.add_argument("--prefill-chunk", dest="max_num_batched_tokens", type=int, default=512,
                       help="tokens per prefill step")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                   help="dtype of the KV pages: auto (the model's compute dtype), float32, bfloat16, "
                        "float16, or int8 (one float32 scale per page and KV head)")
    p.add_argument("--memory", type=float, default=None,
                   help="GiB available (default: device memory, else available host RAM)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of the memory the plan may use (vLLM's gpu_memory_utilization)")


def cmd_plan(args) -> int:
    from serve.memory_plan import describe, plan_memory, verdict

    cfg = read_model_config(args.ckpt)
    kw = dict(context=args.context, **plan_arguments(args))
    if args.context > cfg.max_position_embeddings:
        raise KestrelError(f"--context {args.context:,} exceeds the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings:,})")
    try:
        plan = plan_memory(cfg, **kw)
    except ValueError as e:
        raise KestrelError(str(e)) from None
    text = verdict(plan, cfg, kw)
    if args.json:
        print(json.dumps({**plan.to_dict(), "verdict": text}, indent=2))
    else:
        print(describe(plan, cfg))
        print(text)
    return 0 if plan.fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kestrel", description="Kestrel: a compact reasoning model and its whole stack in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file")
    p.add_argument("src", help="a folder with config.json + *.safetensors, or a .gguf file")
    p.add_argument("--out", required=True, help="the Kestrel checkpoint folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="write int8 weights: int8 (weight-only) or int8-w8a8 (weights and activations)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a Kestrel checkpoint as a safetensors folder")
    p.add_argument("ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text offline")
    p.add_argument("ckpt")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="teacher-forced log-probabilities of token ids")
    p.add_argument("ckpt")
    p.add_argument("--ids", required=True, help="comma-separated token ids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="KV cache and activation memory of serving a context and batch")
    p.add_argument("ckpt", help="a checkpoint folder or a run config file (configs/NAME.py)")
    add_plan_arguments(p, serving=False)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=cmd_plan)

    # `kestrel train ...` hands its arguments to train.loop (see main()); listed here for --help.
    sub.add_parser("train", help="train or distill: --config configs/NAME.py [--workdir DIR] "
                                 "[--set key=value ...] [--resume]", add_help=False)

    from serve.chat_cli import add_chat_arguments, add_serve_arguments, chat_main, serve_main

    p = sub.add_parser("serve", help="serve a checkpoint over gRPC and an OpenAI-compatible HTTP API")
    add_serve_arguments(p)
    p.set_defaults(func=serve_main)

    p = sub.add_parser("chat", help="chat with a running server, streaming reasoning and tools")
    add_chat_arguments(p)
    p.set_defaults(func=chat_main)

    sub.add_parser("batch", help="run an OpenAI batch JSONL file offline: IN OUT [CKPT]",
                   add_help=False)

    p = sub.add_parser("eval", help="evaluate a checkpoint on held-out synthetic problems")
    p.add_argument("ckpt")
    p.add_argument("--suite", required=True, choices=["stem", "tools", "summary", "vision", "reading"],
                   help="vision: problems shown as pictures; reading: pictures of numbers read back "
                        "(both need a model with a vision tower)")
    p.add_argument("--n", type=int, default=100, help="problems per suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-rounds", type=int, default=8, help="tool-call rounds per problem")
    p.add_argument("--constrained", action="store_true",
                   help="decode through the serving engine: grammar-constrained tool calls, reasoning budgets")
    p.add_argument("--effort", choices=["none", "low", "medium", "high", "auto"], default="medium",
                   help="reasoning effort: rendered into the prompt for models trained to heed it "
                        "(the chat template's reasoning_effort); with --constrained also the budget")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="quantize the weights at load: int8 or int8-w8a8")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                   help="the engine's KV cache pages: auto or int8")
    p.add_argument("--decoder", choices=["engine", "generator"], default="engine",
                   help="plain greedy decoding through the serving engine's raw requests "
                        "(continuous batching) or the offline generator in fixed batches")
    p.add_argument("--early-exit", type=float, default=None, metavar="THRESHOLD",
                   help="with --constrained: early-exit decoding at this confidence (a model "
                        "trained with exit heads)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            from train.loop import main as train_main

            return train_main(argv[1:])
        if argv[:1] == ["batch"]:
            from serve.batch import main as batch_main

            return batch_main(argv[1:])
        args = build_parser().parse_args(argv)
        status = args.func(args)
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
