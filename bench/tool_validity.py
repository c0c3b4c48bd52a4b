"""Tool-call validity on complex function schemas, with the grammar constraints off and on.

Seeded-random function schemas (nested objects, arrays with item bounds, enums, required
fields, integers and numbers with bounds, booleans) are offered three at a time; the user asks
for a call to one of them and states every argument value. Each model answers greedily through
Kestrel's engine twice:

- constraints off: a raw request (``channels=False``: no channel machine, no mask), the text
  scored as ``kestrel eval`` scores unconstrained decoding (``train.synthetic.check_tool_calls``:
  the ``<tool_call>`` blocks parse, name an offered function, and validate with ``jsonschema``);
- constraints on: the channel machine's grammar. kestrel-nano has the ``<tool_call>`` tags, so
  its calls go through ``tool_choice="required"`` exactly as ``kestrel serve`` decodes them.
  SmolLM2's vocabulary has no such tags (the channel machine refuses tools for it), so its
  constrained run asks for the call as a JSON answer, ``response_format`` set to the schema of
  one call (``serve.grammar.tool_call_schema``), and scores that answer as its one call.

SmolLM2-135M-Instruct's converted chat template ignores ``tools`` (it renders the messages
only), so the functions reach it in a system message holding the tools block of Kestrel's own
template (the Qwen3/Hermes layout the parser expects); kestrel-nano's template renders them
itself. Prompts end in an empty think block (``enable_thinking=False``), so both modes answer at
once and the constrained run uses ``effort="none"``.

    python bench/tool_validity.py [--schemas 40] [--max-new-tokens 256]
        [--out bench/results/tool_validity_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.common import environment, smollm2_gguf, write_json  # noqa: E402
from model.chat_template import KESTREL_TEMPLATE, ChatTemplate  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from serve.engine import Engine, EngineRequest  # noqa: E402
from serve.grammar import IM_END, FunctionTool, tool_call_schema  # noqa: E402
from serve.request import SamplingParams  # noqa: E402
from train.synthetic import Example, check_tool_calls, parse_tool_calls  # noqa: E402

NANO = str(pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "kestrel-nano")
VERBS = ["book", "create", "update", "search", "schedule", "send", "cancel", "register", "order",
         "estimate", "import", "rate", "plan", "reserve", "transfer", "archive"]
NOUNS = ["flight", "invoice", "meeting", "shipment", "ticket", "account", "report", "playlist",
         "recipe", "rental", "order", "survey", "workout", "payment", "backup", "event"]
FIELDS = ["city", "name", "count", "priority", "tags", "date", "amount", "currency", "notes",
          "level", "items", "owner", "email", "color", "size", "rating", "title", "quantity",
          "address", "options", "status", "channel", "duration", "score", "language", "unit"]
WORDS = ["red", "blue", "paris", "oslo", "alpha", "beta", "high", "low", "daily", "weekly",
         "small", "large", "green", "draft", "final", "north", "south", "usd", "eur", "kg"]


# ----------------------------------------------------------------------------- schemas


def _leaf(rng: np.random.Generator) -> dict[str, Any]:
    kind = rng.integers(6)
    if kind == 0:
        return {"type": "string"}
    if kind == 1:
        return {"enum": [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]}
    if kind == 2:
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(1, 200))}
    if kind == 3:
        lo = int(rng.integers(0, 100))
        return {"type": "number", "exclusiveMinimum": lo, "maximum": lo + int(rng.integers(1, 50)) + 0.5}
    if kind == 4:
        return {"type": "boolean"}
    return {"type": "string", "minLength": 1, "maxLength": int(rng.integers(8, 24))}


def _value_schema(rng: np.random.Generator, depth: int) -> dict[str, Any]:
    kind = rng.integers(5) if depth > 0 else 0
    if kind == 3:
        return {"type": "array", "items": _value_schema(rng, depth - 1),
                "minItems": 1, "maxItems": int(rng.integers(2, 4))}
    if kind == 4:
        return object_schema(rng, depth - 1)
    return _leaf(rng)


def object_schema(rng: np.random.Generator, depth: int) -> dict[str, Any]:
    """An object of 2 to 4 properties, some required, values nested up to ``depth`` levels."""
    names = [str(n) for n in rng.choice(FIELDS, size=int(rng.integers(2, 5)), replace=False)]
    props = {n: _value_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.6] or [names[0]]
    out = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.5:
        out["additionalProperties"] = False
    return out


def instance(schema: dict[str, Any], rng: np.random.Generator) -> Any:
    """A value satisfying ``schema`` (every property filled, so the prompt states them all)."""
    if "enum" in schema:
        return schema["enum"][int(rng.integers(len(schema["enum"])))]
    kind = schema["type"]
    if kind == "object":
        return {k: instance(v, rng) for k, v in schema["properties"].items()}
    if kind == "array":
        return [instance(schema["items"], rng) for _ in range(int(rng.integers(1, schema["maxItems"] + 1)))]
    if kind == "integer":
        return int(rng.integers(schema["minimum"], schema["maximum"] + 1))
    if kind == "number":
        return round(float(rng.uniform(schema["exclusiveMinimum"] + 0.25, schema["maximum"])), 2)
    if kind == "boolean":
        return bool(rng.integers(2))
    words = " ".join(str(w) for w in rng.choice(WORDS, size=2, replace=False))
    return words[: schema.get("maxLength", 64)]


def make_case(index: int, seed: int) -> Example:
    """Three offered functions and a user turn asking for a call to one of them, with its values.

    The expected call is in ``meta["calls"]``, so ``check_tool_calls`` also reports whether the
    right function was called with the stated arguments (``choice_match``, ``exact_match``).
    """
    rng = np.random.default_rng([seed, index])
    names: list[str] = []
    while len(names) < 3:
        name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
        if name not in names:
            names.append(name)
    chosen = int(rng.integers(3))
    tools = []
    for i, name in enumerate(names):
        # Nesting two levels deep for the function asked for, one for the others (shorter prompts).
        params = object_schema(rng, depth=2 if i == chosen else 1)
        FunctionTool(name, params)  # refuses a schema the grammar backend cannot enforce
        tools.append({"type": "function", "function": {
            "name": name, "description": name.replace("_", " ").capitalize() + ".", "parameters": params}})
    target = tools[chosen]["function"]
    args = instance(target["parameters"], rng)
    lines = "\n".join(f"- {k}: {json.dumps(v)}" for k, v in args.items())
    user = f"Please call {target['name']} with these values:\n{lines}"
    return Example(messages=[{"role": "user", "content": user}], tools=tools,
                   meta={"prompt_len": 1, "calls": [{"name": target["name"], "arguments": args}]})


# ----------------------------------------------------------------------------- prompts


def tools_system_message(tools: list[dict]) -> dict[str, str]:
    """The system turn Kestrel's template writes for ``tools``, as a message any template renders."""
    text = ChatTemplate(KESTREL_TEMPLATE).render([{"role": "user", "content": ""}], tools=tools,
                                                 add_generation_prompt=False)
    start = "<|im_start|>system\n"
    if not text.startswith(start):
        raise ValueError("Kestrel's template no longer opens its tools block with a system turn")
    return {"role": "system", "content": text[len(start):text.index(IM_END)]}


def prompt_ids(tokenizer, case: Example, own_tools: bool) -> list[int]:
    messages = case.prompt_messages()
    tools = case.tools
    if not own_tools:
        messages, tools = [tools_system_message(case.tools)] + messages, None
    text = tokenizer.render_chat(messages, tools=tools, add_generation_prompt=True, enable_thinking=False)
    return tokenizer.encode(text)


# ----------------------------------------------------------------------------- scoring


def score(case: Example, calls: list[Any], ended: bool) -> dict[str, Any]:
    """One answer's scores; each of parses / names_offered / schema_valid includes the ones
    before it (a call that does not parse names no offered function), and an answer without a
    call is invalid: a call was asked for."""
    check = check_tool_calls(case, calls)
    made = bool(calls)
    parses = made and check["parses"]
    offered = parses and check["names_offered"]
    return {"made_call": made, "finished": ended, "n_calls": len(calls),
            "parses": parses, "names_offered": offered,
            "schema_valid": offered and check["schema_valid"], "valid": made and check["valid"],
            "choice_match": check["choice_match"], "exact_match": check["exact_match"],
            "errors": check["errors"][:3]}


def summarize(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    out = {k: sum(r[k] for r in rows) / n for k in
           ("made_call", "finished", "parses", "names_offered", "schema_valid", "valid",
            "choice_match", "exact_match")}
    out["invalid_rate"] = 1.0 - out["valid"]
    with_call = [r for r in rows if r["made_call"]]
    out["invalid_rate_among_calls"] = (1.0 - sum(r["valid"] for r in with_call) / len(with_call)
                                       if with_call else None)
    out["n"] = n
    return out


def run(engine: Engine, tokenizer, cases: list[Example], *, constrained: bool, own_tools: bool,
        max_new: int) -> tuple[list[dict], dict]:
    stops = tuple(sorted(tokenizer.stop_ids))
    params = SamplingParams(max_tokens=max_new, temperature=0.0, stop_token_ids=stops)
    handles = []
    for case in cases:
        ids = prompt_ids(tokenizer, case, own_tools)
        if not constrained:
            req = EngineRequest(prompt_token_ids=ids, channels=False, params=params, store=False)
        elif own_tools:
            req = EngineRequest(prompt_token_ids=ids, tools=case.tools, tool_choice="required",
                                effort="none", params=params, store=False)
        else:  # no tool-call tags in the vocabulary: the call is the JSON answer
            fns = [FunctionTool(t["function"]["name"], t["function"]["parameters"]) for t in case.tools]
            req = EngineRequest(prompt_token_ids=ids, response_format=tool_call_schema(fns),
                                effort="none", params=params, store=False)
        handles.append(engine.submit(req))
    t = time.perf_counter()
    engine.run_until_idle()
    seconds = time.perf_counter() - t
    rows = []
    for case, h in zip(cases, handles):
        out = list(h.output_token_ids)
        ended = bool(out) and out[-1] in tokenizer.stop_ids
        text = tokenizer.decode(out[:-1] if ended else out)
        if constrained and not own_tools:
            try:
                calls = [json.loads(text)] if text.strip() else []
            except ValueError:
                calls = [None]
        else:
            calls = parse_tool_calls(text)
        row = score(case, calls, ended)
        row["text"] = text[:400]
        rows.append(row)
    tokens = sum(len(h.output_token_ids) for h in handles)
    return rows, {"seconds": seconds, "output_tokens": tokens}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemas", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--smollm2", default=None, help="a converted SmolLM2 folder (default: convert now)")
    ap.add_argument("--nano", default=NANO)
    ap.add_argument("--models", default="kestrel-nano,SmolLM2-135M-Instruct",
                    help="comma-separated subset of kestrel-nano,SmolLM2-135M-Instruct")
    ap.add_argument("--smollm2-schemas", type=int, default=None,
                    help="fewer schemas for SmolLM2 (its prompts cost far more to prefill)")
    ap.add_argument("--keep-text", action="store_true", help="keep every output's text in the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    cases = [make_case(i, args.seed) for i in range(args.schemas)]
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {"kestrel-nano", "SmolLM2-135M-Instruct"})
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose among kestrel-nano, SmolLM2-135M-Instruct")
    smollm2 = args.smollm2
    if smollm2 is None and "SmolLM2-135M-Instruct" in wanted:
        from model.convert import convert_checkpoint

        smollm2 = os.path.join(tempfile.mkdtemp(prefix="kestrel_bench_"), "smollm2")
        convert_checkpoint(smollm2_gguf(), smollm2)
    result: dict[str, Any] = {
        "bench": "tool_validity", "schemas": args.schemas, "seed": args.seed,
        "functions_offered_per_prompt": 3, "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, Kestrel engine; prompts end in an empty think block",
        "example_schema": cases[0].tools[0]["function"]["parameters"],
        "models": {},
    }
    for label, ckpt in (("kestrel-nano", args.nano), ("SmolLM2-135M-Instruct", smollm2)):
        if label not in wanted:
            continue
        n = args.smollm2_schemas if label.startswith("SmolLM2") and args.smollm2_schemas else args.schemas
        model, tok = load_checkpoint(ckpt)
        own_tools = tok.chat_template.shows_tools
        pages = n * -(-(1200 + args.max_new_tokens) // 16)
        engine = Engine(model, tok, num_pages=pages, page_size=16, max_num_seqs=n,
                        max_num_batched_tokens=2048)
        entry: dict[str, Any] = {
            "checkpoint": ckpt, "schemas": n, "template_renders_tools": own_tools,
            "tools_shown_by": "its chat template" if own_tools else "a system message (Kestrel's tools block)",
            "constrained_by": ("tool_choice=required (tool-call grammar)" if own_tools else
                               "response_format = the schema of one call (no <tool_call> token)"),
        }
        for mode, constrained in (("unconstrained", False), ("constrained", True)):
            rows, timing = run(engine, tok, cases[:n], constrained=constrained, own_tools=own_tools,
                               max_new=args.max_new_tokens)
            entry[mode] = {"summary": summarize(rows), **timing}
            entry[mode]["rows"] = rows if args.keep_text else [
                {k: v for k, v in r.items() if k != "text"} for r in rows]
            entry[mode]["sample_outputs"] = [r["text"] for r in rows[:3]]
            print(label, mode, json.dumps(entry[mode]["summary"]), flush=True)
        result["models"][label] = entry
        result["environment"] = environment()
        if args.out:  # after each model, so a long run keeps what it finished
            write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
