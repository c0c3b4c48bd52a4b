"""``kestrel eval``: a checkpoint on held-out synthetic problems, with and without tools.

Problems come from the generator's ``heldout`` split with seeds no training stream uses. Each
conversation starts from the example's prompt (the chat template with its tools and the generation
prompt); the model writes a turn; tool calls in it are executed (``calculator`` by
``serve.tools.calculator.calculate``, ``python`` by the generator's runner, the function-calling
suite's fake functions by the results the example recorded for the expected calls) and their
results are appended as a ``<tool_response>`` turn, until a turn makes no call, a turn is cut off
by ``max_new_tokens``, or ``max_rounds`` turns were written. Every round is one batched
``Generator.generate`` call over all open conversations.

Scores, per task, per level and overall, for each mode (``tools``, ``no_tools``):

- ``accuracy``: ``check_answer`` on the whole final exchange;
- ``call_validity``: among conversations that made calls, the share whose calls all parse, name an
  offered function and satisfy its schema (``check_tool_calls``); ``call_parses``,
  ``call_names_offered`` and ``call_schema_valid`` are the three parts on their own;
- ``choice_match`` / ``exact_match`` (tools suite): the first turn's calls against the expected
  ones, by function name and by name plus arguments;
- ``reasoning_tokens``, ``generated_tokens``, ``rounds``: means per conversation;
- ``read_digits`` (picture suites): how close the digits of the model's read-off line (its
  reasoning's first line) are to those of the example's (difflib's ratio, 2M / (len(a) + len(b))
  over the two digit strings: 1 is every digit read in order, and writing more digits than the
  picture holds costs as much as missing some). Exact answers need every value read right; this
  shows how much of a picture a model sees before it gets there. Each such row also keeps the two
  lines themselves (``read_line``, ``drawn_line``), to see what a model writes for a picture.

The model side is a *policy*: ``policy(conversations) -> [generated ids]``. `generator_policy`
wraps a model; `oracle_policy` replays each example's own assistant turns, which must score 100%
(a check of the scorer itself).

The ``vision`` suite asks held-out problems shown as pictures (``train/synthetic/images.py``), with
and without tools like ``stem``. A conversation's context keeps one ``<image>`` token per image
and its example carries the PNG bytes (``conv.example.images``); a policy for a model with a vision
tower feeds them: `engine_policy` as ``EngineRequest.images`` (the serving engine inserts the soft
token spans after each marker), `generator_policy` as ``images=`` where the generator takes them.
A checkpoint without a tower, or a decoder that cannot take images, is refused with a message
saying so, before anything is generated. The ``reading`` suite is the tower's drill
(``images.make_reading``): a picture of a few numbers or a price, to be read back verbatim.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json as jsonlib
import sys
import time
from collections import defaultdict
from typing import Any, Callable, TextIO

from kestrel.errors import KestrelError
from serve.tools.calculator import calculate
from train.data import stream_seed
from train.image_tokens import has_vision_tower
from train.synthetic import (IMAGE_SUITES, SUITES, Example, check_answer, check_tool_calls, generate, parse_tool_calls,
                             run_python)
from train.synthetic.render import render_segments
from train.synthetic.checking import call_key

MODES = ("tools", "no_tools")
# Suites whose problems are asked both with and without tools.
BOTH_MODES = ("stem", "vision")


@dataclasses.dataclass
class Conversation:
    """One held-out problem being answered.

    Attributes:
      example: the held-out example.
      mode: ``tools`` or ``no_tools``.
      context: the token ids so far (prompt, the model's turns, tool responses).
      rounds: the text of each turn the model wrote (special tokens kept, the final stop token
        left out).
      round_ids: the ids of each turn, stop token included.
      done: no more turns to write.
      stop: why it ended: ``answer`` (a turn without calls), ``length`` (a turn hit
        max_new_tokens), ``rounds`` (max_rounds reached) or ``context`` (no room left).
      effort: the effort its prompt was rendered at (for ``auto``, a router's choice), or None.
    """

    example: Example
    mode: str
    context: list[int]
    rounds: list[str] = dataclasses.field(default_factory=list)
    round_ids: list[list[int]] = dataclasses.field(default_factory=list)
    done: bool = False
    stop: str = ""
    effort: str | None = None

    @property
    def suite(self) -> str:
        return "tools" if self.example.meta["task"] in SUITES["tools"] else "stem"

    def served_effort(self, effort: str) -> str:
        """The effort an engine request of this conversation asks for at `effort`: for ``auto``,
        the one a router rendered its prompt at (`start`)."""
        return self.effort if effort == "auto" and self.effort else effort


Policy = Callable[[list[Conversation]], list[list[int]]]


def heldout_examples(suite: str, n: int, seed: int = 0) -> list[tuple[Example, Example | None]]:
    """`n` held-out problems of `suite`, cycling over its tasks and levels 1..5.

    Returns:
      ``(with_tools, without_tools)`` pairs: the same problem (same seed) offered with the
      calculator and python, and without tools; ``without_tools`` is None outside `BOTH_MODES`.
    """
    if suite not in SUITES:
        raise KestrelError(f"unknown eval suite {suite!r}; choose one of {', '.join(SUITES)}")
    if n < 1:
        raise KestrelError(f"the number of eval problems must be >= 1, got {n}")
    tasks = SUITES[suite]
    out = []
    for i in range(n):
        task, level = tasks[i % len(tasks)], 1 + (i // len(tasks)) % 5
        s = stream_seed(seed, i, tag="eval")
        with_tools = generate(task, level=level, seed=s, split="heldout", tools=True)
        without = generate(task, level=level, seed=s, split="heldout", tools=False) if suite in BOTH_MODES else None
        out.append((with_tools, without))
    return out


def start(example: Example, mode: str, tokenizer, effort: str | None = None, effort_model=None) -> Conversation:
    """A conversation at the example's prompt, rendered by the tokenizer's chat template; with
    `effort` (low, medium, high, auto) passed to it as ``reasoning_effort``, as the serving engine
    does (a template that reads no such variable renders the same prompt). ``auto`` with an
    `effort_model` (``serve.effort.EffortModel``) that has a router is rendered at the effort the
    router picks from the problem, as the engine does for ``auto`` requests."""
    if effort == "auto" and effort_model is not None:
        effort = effort_model.route(example.prompt_messages()) or effort
    if tokenizer.chat_template is None:
        raise KestrelError("the checkpoint's tokenizer has no chat template; eval needs one")
    # A summary is written without thinking: the prompt ends in Qwen3's empty think block.
    if example.meta["answer_kind"] == "summary":
        kwargs = {"enable_thinking": False}
    else:
        kwargs = {"reasoning_effort": effort} if effort not in (None, "none") else {}
    text = tokenizer.render_chat(example.prompt_messages(), tools=example.tools or None,
                                 add_generation_prompt=True, **kwargs)
    return Conversation(example, mode, tokenizer.encode(text), effort=effort)


def _recorded_results(example: Example) -> dict[str, list[str]]:
    """For the tools suite: the recorded result of each expected call of the final exchange."""
    final = example.messages[example.meta["prompt_len"]:]
    by_id = {m["tool_call_id"]: m["content"] for m in final if m["role"] == "tool"}
    out: dict[str, list[str]] = defaultdict(list)
    for m in final:
        for tc in m.get("tool_calls") or []:
            fn = tc["function"]
            out[call_key(fn["name"], fn["arguments"])].append(by_id.get(tc["id"], ""))
    return out


def run_tool(conv: Conversation, call: Any, used: dict[str, int]) -> str:
    """The tool's output for one parsed call (an error text when the call is unusable)."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return "error: the tool call is not valid JSON with a name"
    name, args = call["name"], call.get("arguments", {})
    offered = {t["function"]["name"] for t in conv.example.tools}
    if name not in offered:
        return f"error: {name!r} is not an available function"
    if not isinstance(args, dict):
        return "error: arguments must be a JSON object"
    if conv.suite == "tools":
        key = call_key(name, args)
        results = _recorded_results(conv.example).get(key, [])
        k = used.get(key, 0)
        used[key] = k + 1
        return results[min(k, len(results) - 1)] if results else jsonlib.dumps({"error": "no such record"})
    try:
        if name == "calculator":
            return calculate(str(args.get("expression", "")))
        if name == "python":
            return run_python(str(args.get("code", "")))
    except ValueError as e:
        return f"error: {e}"
    return f"error: {name!r} has no runner"


def tool_turn(outputs: list[str]) -> str:
    """The text after a turn's ``<|im_end|>``: the tool responses, then the next generation prompt."""
    messages = [{"role": "tool", "content": out} for out in outputs]
    return "\n" + "".join(text for text, _ in render_segments(messages)) + "<|im_start|>assistant\n"


def advance(conv: Conversation, ids: list[int], tokenizer, *, max_rounds: int, stop_ids: set[int],
            used: dict[str, int]) -> None:
    """Records one generated turn and, when it calls tools, appends their responses."""
    ended = bool(ids) and ids[-1] in stop_ids
    text = tokenizer.decode(ids[:-1] if ended else ids)  # the stop token is not part of the answer
    conv.rounds.append(text)
    conv.round_ids.append(list(ids))
    calls = parse_tool_calls(text)
    if not ended:
        conv.done, conv.stop = True, "length"
    elif not calls:
        conv.done, conv.stop = True, "answer"
    elif len(conv.rounds) >= max_rounds:
        conv.done, conv.stop = True, "rounds"
    else:
        conv.context = conv.context + list(ids) + tokenizer.encode(
            tool_turn([run_tool(conv, c, used) for c in calls]))


def run_conversations(convs: list[Conversation], policy: Policy, tokenizer, *, max_rounds: int = 8,
                      context_len: int | None = None) -> None:
    """Plays every conversation to its end, one batched policy call per round."""
    stop_ids = set(tokenizer.stop_ids)
    used = {id(c): {} for c in convs}
    for _ in range(max_rounds):
        open_ = [c for c in convs if not c.done]
        if context_len is not None:
            for c in open_:
                if len(c.context) >= context_len - 1:
                    c.done, c.stop = True, "context"
            open_ = [c for c in open_ if not c.done]
        if not open_:
            break
        for c, ids in zip(open_, policy(open_)):
            advance(c, ids, tokenizer, max_rounds=max_rounds, stop_ids=stop_ids, used=used[id(c)])


def generator_policy(generator, tokenizer, *, max_new_tokens: int, batch_size: int = 32) -> Policy:
    """Greedy decoding with `generator` (a ``model.generate.Generator``), `batch_size` rows at a time.

    Conversations are sorted by length so each batch pads little, and the last batch is padded
    with copies to `batch_size` rows so every round reuses the same compiled shapes. Rows with
    images pass them as ``images=`` (one list of PNG bytes per prompt, ``<image>`` placeholders
    in the prompt ids, in order); `check_takes_images` vets that the generator accepts them.
    """
    from model.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_ids=tuple(sorted(tokenizer.stop_ids)))

    def policy(convs: list[Conversation]) -> list[list[int]]:
        order = sorted(range(len(convs)), key=lambda i: len(convs[i].context))
        out: list[list[int]] = [[] for _ in convs]
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            prompts = [convs[i].context for i in rows]
            prompts += [prompts[-1]] * (batch_size - len(prompts))
            kwargs = {}
            if any(convs[i].example.images for i in rows):  # check_takes_images vetted the decoder
                images = [convs[i].example.images for i in rows]
                kwargs["images"] = images + [images[-1]] * (batch_size - len(images))
            for i, gen in zip(rows, generator.generate(prompts, config, **kwargs)):
                out[i] = gen.token_ids
        return out

    return policy


def eval_engine(model, tokenizer, effort=None, max_num_seqs: int = 32, kv_cache_dtype: str = "auto",
                early_exit: float | None = None):
    """A serving engine sized for eval: `max_num_seqs` conversations at the full context each."""
    from serve.engine import Engine

    pages = max_num_seqs * -(-model.config.max_position_embeddings // 16)
    return Engine(model, tokenizer, num_pages=pages, page_size=16, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=1024, effort=effort, kv_cache_dtype=kv_cache_dtype,
                  early_exit_threshold=early_exit)


def engine_policy(engine, *, max_new_tokens: int, effort: str = "medium", tool_choice: str = "auto") -> Policy:
    """Greedy decoding through the serving engine: continuous batching, and the channel machine.

    Each turn is one ``EngineRequest`` over the conversation's tokens with the example's tools, so
    tool calls are constrained by the grammar of the offered functions' schemas and reasoning is
    bounded by `effort`'s budget, exactly as ``kestrel serve`` decodes. Summary prompts (which end
    in an empty think block) are decoded with ``effort="none"``. `tool_choice` applies where tools
    are offered. A conversation with images passes them (``EngineRequest.images``, one per
    ``<image>`` marker of the prompt ids).
    """
    from serve.engine import EngineRequest
    from serve.request import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)

    def policy(convs: list[Conversation]) -> list[list[int]]:
        handles = []
        for c in convs:
            summary = c.example.meta["answer_kind"] == "summary"
            # Images go with every turn: each is the whole context, its <image> markers included.
            images = {"images": tuple(c.example.images)} if c.example.images else {}
            handles.append(engine.submit(EngineRequest(
                prompt_token_ids=c.context, tools=c.example.tools, store=False, params=params,
                tool_choice=tool_choice if c.example.tools else "none",
                effort="none" if summary else c.served_effort(effort), **images)))
        engine.run_until_idle()
        return [list(h.output_token_ids) for h in handles]

    return policy


def raw_engine_policy(engine, tokenizer, *, max_new_tokens: int) -> Policy:
    """Plain greedy decoding through the serving engine: raw requests (``channels=False``: no
    channel machine, no masks, no budgets), so the model writes what it would with
    `generator_policy`, batched continuously over the paged cache (no row waits for the longest
    of its batch, no padding to a shared length)."""
    from serve.engine import EngineRequest
    from serve.request import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(sorted(tokenizer.stop_ids)))

    def policy(convs: list[Conversation]) -> list[list[int]]:
        handles = [engine.submit(EngineRequest(
            prompt_token_ids=c.context, channels=False, store=False, params=params,
            **({"images": tuple(c.example.images)} if c.example.images else {})))
            for c in convs]
        engine.run_until_idle()
        return [list(h.output_token_ids) for h in handles]

    return policy


def oracle_policy(tokenizer) -> Policy:
    """Replays each example's own assistant turns (its trainable segments), turn by turn."""

    def policy(convs: list[Conversation]) -> list[list[int]]:
        out = []
        for c in convs:
            turns = [text for text, trainable in render_segments(c.example.messages, c.example.tools)
                     if trainable]
            out.append(tokenizer.encode(turns[len(c.rounds)]) if len(c.rounds) < len(turns) else [])
        return out

    return policy


def think_tokens(ids: list[int], think: int | None, end: int | None) -> int:
    """How many tokens of `ids` lie between ``<think>`` and ``</think>``."""
    if think is None or end is None:
        return 0
    n, inside = 0, False
    for t in ids:
        if t == think:
            inside = True
        elif t == end:
            inside = False
        elif inside:
            n += 1
    return n


def score(conv: Conversation, tokenizer) -> dict[str, Any]:
    """One conversation's scores (see the module docstring)."""
    ex = conv.example
    text = "".join(conv.rounds)
    think, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    all_calls = [c for r in conv.rounds for c in parse_tool_calls(r)]
    row: dict[str, Any] = {
        "task": ex.meta["task"], "level": ex.meta["level"], "mode": conv.mode, "stop": conv.stop,
        "correct": check_answer(ex, text),
        "n_calls": len(all_calls),
        "rounds": len(conv.rounds),
        "generated_tokens": sum(len(r) for r in conv.round_ids),
        "reasoning_tokens": sum(think_tokens(r, think, end) for r in conv.round_ids),
    }
    if all_calls:
        probe = dataclasses.replace(ex, meta={**ex.meta, "calls": []})  # validity needs no expectation
        check = check_tool_calls(probe, all_calls)
        row.update(calls_valid=check["valid"], calls_parse=check["parses"],
                   calls_name_offered=check["names_offered"], calls_schema_valid=check["schema_valid"])
    if conv.suite == "tools":
        first = check_tool_calls(ex, conv.rounds[0] if conv.rounds else "")
        row["choice_match"], row["exact_match"] = first["choice_match"], first["exact_match"]
    if ex.images:
        drawn = _first_line(next((m.get("reasoning_content") or "" for m in ex.messages
                                  if m["role"] == "assistant"), ""))
        truth = _digits(drawn)
        if truth:
            said = conv.rounds[0] if conv.rounds else ""
            said = _first_line(said.split("<think>", 1)[1] if "<think>" in said else said)
            row["read_digits"] = difflib.SequenceMatcher(None, truth, _digits(said), autojunk=False).ratio()
            row["read_line"], row["drawn_line"] = said, drawn
    return row


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def aggregate(rows: list[dict]) -> dict[str, Any]:
    """Means over `rows`: accuracy, call validity, choice/exact match, token and round counts."""
    out = {"n": len(rows), "accuracy": _mean(rows, "correct"), "call_validity": _mean(rows, "calls_valid"),
           "call_parses": _mean(rows, "calls_parse"), "call_names_offered": _mean(rows, "calls_name_offered"),
           "call_schema_valid": _mean(rows, "calls_schema_valid"),
           "calls_per_problem": _mean(rows, "n_calls"), "choice_match": _mean(rows, "choice_match"),
           "exact_match": _mean(rows, "exact_match"), "read_digits": _mean(rows, "read_digits"),
           "reasoning_tokens": _mean(rows, "reasoning_tokens"),
           "generated_tokens": _mean(rows, "generated_tokens"), "rounds": _mean(rows, "rounds")}
    return {k: v for k, v in out.items() if v is not None}


def report(rows: list[dict]) -> dict[str, Any]:
    """Per mode: ``overall``, ``by_task`` and ``by_level`` aggregates of the scored rows."""
    out: dict[str, Any] = {}
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        by_task: dict[str, list] = defaultdict(list)
        by_level: dict[str, list] = defaultdict(list)
        for r in sel:
            by_task[r["task"]].append(r)
            by_level[str(r["level"])].append(r)
        out[mode] = {"overall": aggregate(sel),
                     "by_task": {k: aggregate(v) for k, v in by_task.items()},
                     "by_level": {k: aggregate(v) for k, v in sorted(by_level.items())}}
    return out


def evaluate(tokenizer, policy: Policy, suite: str, *, n: int, seed: int = 0, max_rounds: int = 8,
             context_len: int | None = None, effort: str | None = None, effort_model=None,
             modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Plays `n` held-out problems of `suite` (in `modes`: stem has both) with `policy` and scores
    them; prompts are rendered at `effort` (see `start`, with `effort_model`'s router for auto).

    Returns:
      ``{"suite", "n", "seed", "results": report(rows), "rows": [per-conversation scores]}``.
    """
    convs = []
    for with_tools, without in heldout_examples(suite, n, seed):
        if "tools" in modes:
            convs.append(start(with_tools, "tools", tokenizer, effort, effort_model))
        if without is not None and "no_tools" in modes:
            convs.append(start(without, "no_tools", tokenizer, effort, effort_model))
    run_conversations(convs, policy, tokenizer, max_rounds=max_rounds, context_len=context_len)
    rows = [score(c, tokenizer) for c in convs]
    return {"suite": suite, "n": n, "seed": seed, "results": report(rows), "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """A human-readable summary: one line per mode, task and level."""
    cols = ("n", "accuracy", "call_validity", "choice_match", "exact_match", "read_digits", "reasoning_tokens",
            "rounds")
    lines = [f"suite {result['suite']}: {result['n']} problems, seed {result['seed']}",
             f"{'':28}" + "".join(f"{c:>18}" for c in cols)]

    def line(name: str, agg: dict) -> str:
        cells = []
        for c in cols:
            v = agg.get(c)
            cells.append(f"{'-':>18}" if v is None else f"{v:>18d}" if c == "n" else f"{v:>18.3f}")
        return f"{name:28}" + "".join(cells)

    for mode, res in result["results"].items():
        lines.append(line(f"[{mode}] all", res["overall"]))
        lines += [line(f"  {task}", agg) for task, agg in res["by_task"].items()]
        lines += [line(f"  level {lv}", agg) for lv, agg in res["by_level"].items()]
    return "\n".join(lines)


def check_takes_images(model, ckpt_dir: str, engine: bool) -> None:
    """Refuses the vision suite unless the model has a vision tower and the decoder can feed images.

    Raises:
      KestrelError: saying which of the two is missing.
    """
    if not has_vision_tower(model):
        raise KestrelError(f"the model in {ckpt_dir} has no vision tower (its config has no `vision` "
                           "settings), so it cannot read the images of the vision suite; evaluate a "
                           "checkpoint that takes images, or use --suite stem")
    from model.generate import Generator

    from serve.engine import EngineRequest

    if engine:
        if "images" not in {f.name for f in dataclasses.fields(EngineRequest)}:
            raise KestrelError("the model has a vision tower but this build's serving engine takes no images "
                               "(EngineRequest has no `images`)")
    elif "images" not in inspect.signature(Generator.generate).parameters:
        raise KestrelError("the model has a vision tower but plain greedy decoding (model.generate.Generator) "
                           "cannot feed it images; decode through the serving engine (--decoder engine)")


def run_eval(ckpt_dir: str, suite: str, *, n: int = 100, seed: int = 0, max_new_tokens: int = 512,
             json: bool = False, batch_size: int = 32, max_rounds: int = 8, constrained: bool = False,
             effort: str = "medium", quantize: str | None = None, kv_cache_dtype: str = "auto",
             early_exit: float | None = None, decoder: str = "engine",
             out: TextIO | None = sys.stdout) -> dict[str, Any]:
    """``kestrel eval CKPT --suite stem|tools|summary|vision|reading [--json]``: loads, plays, scores, prints.

    Args:
      ckpt_dir: a Kestrel checkpoint folder with a tokenizer and chat template.
      suite: ``stem`` (each problem with and without tools), ``tools`` (function calling),
        ``summary`` (one-line summaries of reasoning), ``vision`` (problems shown as pictures,
        with and without tools; the model needs a vision tower) or ``reading`` (pictures of a few
        numbers read back verbatim; a vision tower too).
      n: problems (the stem suite plays 2n conversations).
      seed: the held-out seed.
      max_new_tokens: the limit of one model turn.
      json: print the result as one JSON object (else a table).
      batch_size: rows per generation call (the engine: sequences in flight).
      max_rounds: model turns per conversation at most.
      constrained: decode through the serving engine's channel machine (`engine_policy`):
        grammar-constrained tool calls and reasoning budgets; else plain greedy decoding.
      decoder: for plain greedy decoding, ``engine`` (raw engine requests, `raw_engine_policy`)
        or ``generator`` (``model.generate.Generator`` in fixed batches, `generator_policy`).
      effort: the reasoning effort (low, medium, high, auto; none disables thinking when
        `constrained`): the prompts are rendered with it (``reasoning_effort``, for models trained
        to heed it) and, when `constrained`, the engine bounds reasoning by its budget; ``auto``
        with a router in the checkpoint's ``effort.json`` renders each prompt at the effort the
        router picks for it.
      quantize: quantize the weights at load (``int8``, ``int8-w8a8``), or None.
      kv_cache_dtype: ``auto`` or ``int8`` KV pages (the engine's paged cache, either decoding).
      early_exit: with `constrained`, decode with early exit at this confidence threshold (a
        model trained with exit heads); None: every layer.
      out: where to print; None prints nothing.

    Returns:
      The result dict of `evaluate` plus ``checkpoint``, ``max_new_tokens`` and ``seconds``.

    Raises:
      KestrelError: not a checkpoint, no tokenizer or chat template, unknown suite, bad n, or the
        vision suite for a model without a vision tower (or a decoder that cannot take images).
    """
    from model.checkpoint import load_checkpoint
    from model.generate import Generator

    from model.quantization import check_kv_cache_dtype

    if max_new_tokens < 1 or batch_size < 1 or max_rounds < 1:
        raise KestrelError("max_new_tokens, batch_size and max_rounds must be >= 1")
    if check_kv_cache_dtype(kv_cache_dtype) != "auto" and decoder != "engine":
        raise KestrelError("--kv-cache-dtype needs the engine decoder (its paged KV cache)")
    if early_exit is not None and not constrained:
        raise KestrelError("--early-exit needs --constrained (early exit runs in the serving engine)")
    if decoder not in ("engine", "generator"):
        raise KestrelError(f"decoder must be engine or generator, got {decoder!r}")
    if constrained and decoder != "engine":
        raise KestrelError("--constrained decodes through the engine; it cannot use --decoder generator")
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(ckpt_dir, quantize=quantize)
    if tokenizer is None:
        raise KestrelError(f"{ckpt_dir} has no tokenizer; eval needs one")
    if suite in IMAGE_SUITES:
        check_takes_images(model, ckpt_dir, constrained or decoder == "engine")
    effort_model = None
    if constrained or effort == "auto":
        from serve.effort import EffortModel

        try:
            effort_model = EffortModel.load(ckpt_dir)
        except ValueError as e:
            raise KestrelError(str(e)) from None
    if constrained:
        try:
            engine = eval_engine(model, tokenizer, effort_model, batch_size, kv_cache_dtype, early_exit)
        except ValueError as e:  # a model without exit heads, a threshold outside [0, 1]
            raise KestrelError(str(e)) from None
        policy = engine_policy(engine, max_new_tokens=max_new_tokens, effort=effort)
    elif decoder == "engine":
        engine = eval_engine(model, tokenizer, max_num_seqs=batch_size, kv_cache_dtype=kv_cache_dtype)
        policy = raw_engine_policy(engine, tokenizer, max_new_tokens=max_new_tokens)
    else:
        policy = generator_policy(Generator(model), tokenizer, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    result = evaluate(tokenizer, policy, suite, n=n, seed=seed, max_rounds=max_rounds,
                      context_len=model.config.max_position_embeddings, effort=effort,
                      effort_model=effort_model)
    result.update(checkpoint=str(ckpt_dir), max_new_tokens=max_new_tokens,
                  quantization=model.config.quantization, kv_cache_dtype=kv_cache_dtype,
                  decoding=(f"engine, effort {effort}" if constrained
                            else "greedy, engine (raw)" if decoder == "engine" else "greedy, generator"),
                  effort=effort,
                  early_exit=early_exit,
                  # decode steps per exit layer taken (0: every layer ran)
                  exit_counts=dict(engine.runner.exit_counts) if early_exit is not None else None,
                  seconds=round(time.perf_counter() - t0, 2))
    if out is not None:
        print(jsonlib.dumps(result) if json else format_table(result), file=out)
    return result
