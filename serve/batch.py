"""Offline batch processing: OpenAI batch JSONL in, JSONL out (``kestrel batch IN OUT [CKPT]``).

Each input line is ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {"messages": [...], "max_tokens": ..., ...}}``; each output line is
``{"id", "custom_id", "response": {"status_code", "request_id", "body": <chat.completion>},
"error"}``, in input order. A line the engine refuses (bad options, a prompt beyond the context)
gets ``status_code`` 400 and an ``error``; the rest of the batch still runs.

Shared work is computed once: requests are submitted sorted by their rendered prompt, so those
that share a prefix (a long system prompt, few-shot examples) are admitted together, and the
scheduler defers a request whose next page another request is computing right now until that page
is in the prefix cache. A progress bar (tqdm) counts finished requests.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

from kestrel.errors import KestrelError
from serve import events as ev
from serve.engine import Engine, EngineRequest, RequestHandle
from serve.request import SamplingParams

CHAT_URL = "/v1/chat/completions"


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What a batch run did."""

    num_requests: int
    num_failed: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    computed_tokens: int  # tokens the model computed, shared prefixes once
    seconds: float


def read_batch(path: str | Path) -> list[dict[str, Any]]:
    """Parses an OpenAI batch input file.

    Raises:
      KestrelError: the file is missing, a line is not JSON, or lacks ``custom_id``/``body``.
    """
    p = Path(path)
    if not p.is_file():
        raise KestrelError(f"batch input {str(p)!r} does not exist")
    lines, seen = [], set()
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as e:
            raise KestrelError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) \
                or not isinstance(line.get("body"), dict):
            raise KestrelError(f"{p}:{n}: each line needs a string 'custom_id' and an object 'body'")
        if line.get("url", CHAT_URL) != CHAT_URL:
            raise KestrelError(f"{p}:{n}: only {CHAT_URL} is supported, got {line.get('url')!r}")
        if line["custom_id"] in seen:
            raise KestrelError(f"{p}:{n}: custom_id {line['custom_id']!r} appears twice")
        seen.add(line["custom_id"])
        lines.append(line)
    return lines


def request_from_body(body: dict[str, Any], request_id: str | None = None) -> EngineRequest:
    """An ``EngineRequest`` from a chat-completions body.

    Raises:
      ValueError: an option is malformed or unsupported.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("body.messages must be a non-empty list")
    sp: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sp["max_tokens"] = max_tokens
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                     ("min_p", "min_p"), ("seed", "seed"), ("frequency_penalty", "frequency_penalty"),
                     ("presence_penalty", "presence_penalty"),
                     ("repetition_penalty", "repetition_penalty"), ("logprobs", "logprobs"),
                     ("top_logprobs", "top_logprobs")):
        if body.get(src) is not None:
            sp[dst] = body[src]
    if body.get("n", 1) != 1:
        raise ValueError("n > 1 is not supported in batch mode")
    tool_choice = body.get("tool_choice", "auto")
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name")
        if not tool_choice:
            raise ValueError("tool_choice object needs function.name")
    response_format = None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        response_format = (rf.get("json_schema") or {}).get("schema")
        if response_format is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
    elif isinstance(rf, dict) and rf.get("type") == "json_object":
        response_format = {"type": "object"}
    elif rf not in (None, {"type": "text"}):
        raise ValueError(f"unsupported response_format {rf!r}")
    effort = body.get("reasoning_effort") or "medium"
    if effort == "minimal":
        effort = "none"
    return EngineRequest(messages=messages, tools=body.get("tools") or (), tool_choice=tool_choice,
                         parallel_tool_calls=body.get("parallel_tool_calls", True),
                         response_format=response_format, effort=effort,
                         params=SamplingParams(**sp), store=False, request_id=request_id)


def completion_body(handle: RequestHandle, model_name: str) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished request."""
    calls = [{"id": f"call_{handle.request_id}_{e.index}", "type": "function",
              "function": {"name": e.name, "arguments": e.arguments}}
             for e in handle.events if isinstance(e, ev.ToolCallDone)]
    message: dict[str, Any] = {"role": "assistant", "content": handle.text(ev.AnswerDelta) or None}
    reasoning = handle.text(ev.ReasoningDelta)
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    u = handle.usage or ev.Usage()
    return {
        "id": handle.request_id, "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": handle.finish_reason}],
        "usage": {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                  "total_tokens": u.total_tokens,
                  "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
                  "completion_tokens_details": {
                      "reasoning_tokens": u.reasoning_tokens,
                      "accepted_prediction_tokens": u.accepted_prediction_tokens,
                      "rejected_prediction_tokens": u.rejected_prediction_tokens}},
    }


def run_batch(engine: Engine, in_path: str | Path, out_path: str | Path, *, model_name: str = "kestrel",
              progress: bool = True) -> BatchSummary:
    """Runs every request of a batch file through ``engine`` (driven here, not started).

    Returns:
      Totals of the run.
    """
    lines = read_batch(in_path)
    t0 = time.perf_counter()
    computed0 = engine.scheduler.num_computed_tokens
    results: list[dict[str, Any] | None] = [None] * len(lines)
    prepared = []
    for i, line in enumerate(lines):
        try:
            req = request_from_body(line["body"], request_id=f"batch_req_{i}")
            text = engine.tokenizer.render_chat(list(req.messages)) if engine.tokenizer else ""
            prepared.append((text, i, req))
        except (ValueError, TypeError, KestrelError) as e:
            results[i] = _error_line(i, line, str(e))
    prepared.sort(key=lambda x: x[0])  # shared prefixes end up side by side
    handles: dict[int, RequestHandle] = {}
    for _, i, req in prepared:
        try:
            handles[i] = engine.submit(req)
        except (ValueError, TypeError, KestrelError) as e:
            results[i] = _error_line(i, lines[i], str(e))
    bar = _progress(len(handles), progress)
    done = 0
    while engine.has_work():
        engine.step()
        now = sum(h.finished for h in handles.values())
        if bar is not None and now > done:
            bar.update(now - done)
        done = now
    if bar is not None:
        bar.close()
    for i, h in handles.items():
        results[i] = {"id": f"batch_req_{i}", "custom_id": lines[i]["custom_id"],
                      "response": {"status_code": 200, "request_id": h.request_id,
                                   "body": completion_body(h, model_name)}, "error": None}
    Path(out_path).write_text("".join(json.dumps(r) + "\n" for r in results))
    usages = [h.usage or ev.Usage() for h in handles.values()]
    return BatchSummary(
        num_requests=len(lines), num_failed=len(lines) - len(handles),
        prompt_tokens=sum(u.input_tokens for u in usages),
        cached_prompt_tokens=sum(u.cached_input_tokens for u in usages),
        completion_tokens=sum(u.output_tokens for u in usages),
        computed_tokens=engine.scheduler.num_computed_tokens - computed0,
        seconds=time.perf_counter() - t0)


def _error_line(i: int, line: dict, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{i}", "custom_id": line["custom_id"],
            "response": {"status_code": 400, "request_id": None, "body": None},
            "error": {"code": "invalid_request", "message": message}}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="batch")


def main(argv: Sequence[str] | None = None) -> int:
    """``kestrel batch IN OUT [CKPT]``: runs a batch file on a checkpoint (default kestrel-nano)."""
    import argparse

    ap = argparse.ArgumentParser(prog="kestrel batch", description=__doc__.splitlines()[0])
    ap.add_argument("input", help="OpenAI batch JSONL")
    ap.add_argument("output", help="where to write the results JSONL")
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/kestrel-nano")
    ap.add_argument("--num-pages", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from model.checkpoint import load_checkpoint

    if not Path(args.checkpoint).is_dir():
        raise KestrelError(f"checkpoint folder {args.checkpoint!r} does not exist")
    model, tokenizer = load_checkpoint(args.checkpoint)
    if tokenizer is None:
        raise KestrelError(f"checkpoint {args.checkpoint!r} has no tokenizer; batch needs one")
    engine = Engine(model, tokenizer, num_pages=args.num_pages, page_size=args.page_size,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    s = run_batch(engine, args.input, args.output, model_name=Path(args.checkpoint).name,
                  progress=not args.no_progress)
    print(f"{s.num_requests} requests ({s.num_failed} failed), {s.completion_tokens} output tokens, "
          f"{s.cached_prompt_tokens}/{s.prompt_tokens} prompt tokens from the prefix cache, "
          f"{s.seconds:.1f}s")
    return 0
