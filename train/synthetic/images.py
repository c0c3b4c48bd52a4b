"""Problems shown as pictures: a STEM question's text, a table, a bar chart, a right triangle.

Each task draws its values from the example's RNG, draws a picture of them with Pillow
(``figures.py``; looks come from a separate style RNG, see ``drawing.py``) and asks about it in
text. The result is an ordinary STEM `Problem` with three additions, so the regular reasoning
scheme, tool calls, answers, summaries and checking all apply unchanged:

- ``question`` holds one ``<image>`` placeholder (``IMAGE_PLACEHOLDER``), where the picture goes;
- ``images`` holds the picture as PNG bytes (sides 224..288 px, drawn legible at 224);
- ``reads`` is the reasoning's first line, the values read off the picture ("The chart shows
  apples = 34, pears = 21."), which the later steps copy into calculator calls (it stands in
  for the ``Given:`` line of text problems);
- ``figure`` (kept in ``meta["figure"]``) records what was drawn: the kind, the values and every
  string on the picture, so checks tie answers to the pixels' source without OCR.

The contract with the model side (the vision tower and its preprocessing live in ``model/``):
an `Example` carries ``images: list[bytes]``; the user text holds one ``<image>`` per image, in
order. ``train.data`` follows each ``<image>`` token by ``image_tokens`` copies of
``<|image_pad|>`` (where the tower's soft tokens are spliced) and gives the batch
``image_span_ids`` [B, T] (m + 1 on the pads of the batch's m-th image, 0 elsewhere; usable as
the model's bidirectional ``span_ids``) and ``images`` (the batch's PNG bytes, in span-id order).
The loss mask never covers a pad: they sit in the user turn.

Held-out problems use other item, place and label names than training ones (like the other
tasks' vocabularies), on top of the eval's disjoint seeds.

Gallery for a human look: ``python -m train.synthetic.images --out DIR --n 12``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import random
from fractions import Fraction

from serve.tools.calculator import format_number
from train.synthetic.drawing import png_bytes, style_rng
from train.synthetic.drills import random_number
from train.synthetic.example import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, Example
from train.synthetic.figures import Figure, draw_bar_chart, draw_right_triangle, draw_table, draw_text
from train.synthetic.problem import Problem, Step, pick, rand_decimal

# The text tasks whose questions are drawn as images.
TEXT_SOURCES = ("arithmetic", "percentages", "word_problems", "linear_equations", "unit_conversion", "physics",
                "chemistry", "combinatorics")

_GOODS = {
    "train": ("pencil", "notebook", "eraser", "ruler", "marker", "stapler", "folder", "glue stick", "crayon", "binder"),
    "heldout": ("mug", "plate", "bowl", "kettle", "spoon", "napkin", "candle", "vase", "teapot", "tray"),
}
_TOWNS = {
    "train": ("Oakton", "Riverby", "Hillcrest", "Lowfield", "Stonebrook", "Fairview", "Elmstead", "Marsh End"),
    "heldout": ("Pinecliff", "Ashford", "Brookvale", "Cedarton", "Dunmore", "Glenrock", "Kingsway", "Westmoor"),
}
_CHART_TOPICS = {
    "train": (("Votes per fruit", ("apple", "pear", "plum", "grape", "kiwi", "mango", "lime", "fig")),
              ("Goals per player", ("Ana", "Ben", "Chen", "Dara", "Eli", "Gus", "Hana", "Ivan")),
              ("Cars per colour", ("red", "blue", "green", "black", "white", "grey", "silver", "gold"))),
    "heldout": (("Votes per vegetable", ("leek", "kale", "bean", "okra", "corn", "pea", "yam", "beet")),
                ("Points per team", ("Lions", "Hawks", "Bears", "Wolves", "Foxes", "Owls", "Sharks", "Bees")),
                ("Books per month", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug"))),
}
_TEXT_ASKS = ("Solve the problem in the image.", "Answer the question shown in the picture.",
              "What is the answer to the problem in this image?", "Please solve this.",
              "Work out the problem in the image.")
# Pythagorean triples for exact levels 1-2 (legs, hypotenuse).
_TRIPLES = ((3, 4, 5), (5, 12, 13), (6, 8, 10), (8, 15, 17), (7, 24, 25), (9, 12, 15), (20, 21, 29), (12, 16, 20))


def _figure_record(fig: Figure, record: dict) -> dict:
    """`record` (what was drawn) plus every string on `fig`, its ink boxes, each character's ink
    centre, size, background and style."""
    return {**record, "texts": fig.texts, "boxes": [list(b) for b in fig.boxes],
            "glyphs": [[ch, round(x, 1), round(y, 1)] for ch, x, y in fig.glyphs],
            "size": list(fig.image.size), "background": list(fig.background), "style": fig.style}


def _pictured(p: Problem, fig: Figure, ask: str, reads: str, record: dict) -> Problem:
    """`p` asked about the picture `fig`: placeholder first, then the text question."""
    return dataclasses.replace(p, question=f"{IMAGE_PLACEHOLDER}\n{ask}", reads=reads,
                               images=[png_bytes(fig.image)], figure=_figure_record(fig, record))


def make_text_image(rng: random.Random, level: int, split: str) -> Problem:
    """A STEM problem of another task whose whole question is the picture of its text."""
    from train.synthetic.registry import TASKS  # the registry imports this module

    source = pick(rng, TEXT_SOURCES)
    p = TASKS[source].make(rng, level, split)
    fig = draw_text(p.question, style_rng(rng), level)
    return _pictured(p, fig, pick(rng, _TEXT_ASKS), f"The image reads: {p.question}",
                     {"kind": "text", "source_task": source, "text": p.question})


def _money(rng: random.Random, level: int) -> str:
    return rand_decimal(rng, 1, (9, 20, 30, 50, 99)[level - 1], 0 if level <= 2 else 2)


def make_table_image(rng: random.Random, level: int, split: str) -> Problem:
    """A price list (item, unit price, quantity) or a rainfall table (town, two months)."""
    n = min(2 + level, 7)
    if rng.random() < 0.5:
        items = rng.sample(_GOODS[split], n)
        prices = [_money(rng, level) for _ in items]
        qty = [str(rng.randint(1, 9 if level <= 2 else 20)) for _ in items]
        rows = [["Item", "Price ($)", "Qty"]] + [[i, p, q] for i, p, q in zip(items, prices, qty)]
        title = pick(rng, ("Shopping list", "Order", "Price list", "Receipt"))
        kinds = ("row", "difference") + (("two_rows",) if level >= 2 else ()) + (("all",) if level >= 4 else ())
        ask_kind = pick(rng, kinds)
        x, y = rng.sample(range(n), 2)
        if ask_kind == "difference":
            while float(prices[x]) == float(prices[y]):
                prices[x] = _money(rng, level)
                rows[x + 1][1] = prices[x]
            if float(prices[x]) < float(prices[y]):
                x, y = y, x
        use = {"row": [x], "difference": [x, y], "two_rows": [x, y], "all": list(range(n))}[ask_kind]
        facts = [f"{items[k]}: price ${prices[k]}, quantity {qty[k]}" for k in use]
        if ask_kind == "row":
            steps = [Step(f"the cost of the {items[x]}s", f"{prices[x]} * {qty[x]}")]
            ask = pick(rng, (f"How much do the {items[x]}s in the table cost altogether?",
                             f"What is the total cost of the {items[x]} row?"))
            plan, summary = "cost = price * quantity.", f"Price times quantity of the {items[x]}s: {{answer}}."
        elif ask_kind == "difference":
            steps = [Step("the price difference", f"{prices[x]} - {prices[y]}")]
            ask = f"How much more does one {items[x]} cost than one {items[y]}?"
            plan, summary = "Subtract the two unit prices.", f"One {items[x]} minus one {items[y]}: {{answer}}."
        elif ask_kind == "two_rows":
            steps = [Step(f"the cost of the {items[k]}s", f"{prices[k]} * {qty[k]}") for k in (x, y)]
            steps.append(Step("the total cost", "{r0} + {r1}"))
            ask = f"What do the {items[x]}s and the {items[y]}s cost together?"
            plan, summary = "Price times quantity for each row, then add.", "Added the two rows' costs: {answer}."
        else:
            steps = [Step("the total of the order", " + ".join(f"{p} * {q}" for p, q in zip(prices, qty)))]
            ask = pick(rng, ("What is the total cost of everything in the table?",
                             "How much does the whole order cost?"))
            plan = "Add price times quantity over every row."
            summary = "Summed price times quantity over all rows: {answer}."
        unit, record = "$", {"kind": "table", "topic": "prices", "items": items, "prices": prices, "quantities": qty}
    else:
        towns = rng.sample(_TOWNS[split], n)
        months = pick(rng, (("Jan", "Feb"), ("Mar", "Apr"), ("May", "Jun"), ("Sep", "Oct")))
        hi = (40, 80, 120, 200, 300)[level - 1]
        rain = [[rand_decimal(rng, 1, hi, 0 if level <= 3 else 1) for _ in months] for _ in towns]
        rows = [["Town", f"{months[0]} (mm)", f"{months[1]} (mm)"]] + [[t] + r for t, r in zip(towns, rain)]
        title = "Rainfall"
        ask_kind = pick(rng, ("town_total", "month_difference") + (("mean",) if level >= 3 else ()))
        x, y = rng.sample(range(n), 2)
        m = rng.randrange(2)
        if ask_kind == "town_total":
            use, facts = [x], [f"{towns[x]}: {months[0]} {rain[x][0]} mm, {months[1]} {rain[x][1]} mm"]
            steps = [Step(f"the rainfall of {towns[x]} over both months", f"{rain[x][0]} + {rain[x][1]}")]
            ask = f"How much rain fell in {towns[x]} in {months[0]} and {months[1]} together?"
            plan, summary = "Add the two months.", f"Added {towns[x]}'s two months: {{answer}}."
        elif ask_kind == "month_difference":
            if float(rain[x][m]) < float(rain[y][m]):
                x, y = y, x
            use, facts = [x, y], [f"{towns[k]} in {months[m]}: {rain[k][m]} mm" for k in (x, y)]
            steps = [Step("the difference", f"{rain[x][m]} - {rain[y][m]}")]
            ask = f"How much more rain fell in {towns[x]} than in {towns[y]} in {months[m]}?"
            plan, summary = "Subtract the two values.", f"{towns[x]} minus {towns[y]} in {months[m]}: {{answer}}."
        else:
            use = list(range(n))
            facts = [f"{months[m]}: " + ", ".join(f"{t} {r[m]} mm" for t, r in zip(towns, rain))]
            steps = [Step(f"the mean rainfall in {months[m]}", f"({' + '.join(r[m] for r in rain)}) / {n}")]
            ask = f"What was the mean rainfall of the towns in the table in {months[m]}?"
            plan = "Add the column and divide by the number of towns."
            summary = f"Mean of the {months[m]} column: {{answer}}."
        unit = "mm"
        record = {"kind": "table", "topic": "rainfall", "towns": towns, "months": list(months), "rain": rain,
                  "month": m}
    fig = draw_table(title, rows, style_rng(rng))
    record.update(question=ask_kind, rows_used=use)
    p = Problem(question="", kind=f"reading a table ({ask_kind.replace('_', ' ')})", given=[], plan=plan,
                steps=steps, unit=unit, summary=summary, tolerance=1e-6)
    return _pictured(p, fig, ask, "The table shows " + "; ".join(facts) + ".", record)


def make_chart_image(rng: random.Random, level: int, split: str) -> Problem:
    """A bar chart with a number on every bar; asks the largest, smallest, a difference, a sum or a ratio."""
    title, vocab = pick(rng, _CHART_TOPICS[split])
    n = 3 + min(level, 4)
    labels = rng.sample(vocab, n)
    hi = (20, 60, 150, 500, 2000)[level - 1]
    values = [str(rng.randint(1, hi)) for _ in labels]
    kinds = ("largest", "difference", "sum") + (("smallest", "ratio") if level >= 2 else ())
    ask_kind = pick(rng, kinds)
    x, y, z = rng.sample(range(n), 3)
    if ask_kind == "ratio":  # exact multiples keep the answer short
        values[y] = str(rng.randint(1, max(1, hi // 5)))
        values[x] = str(int(values[y]) * rng.randint(2, 5))
    if ask_kind == "difference":
        while values[x] == values[y]:
            values[x] = str(rng.randint(1, hi))
        if int(values[x]) < int(values[y]):
            x, y = y, x
    use = {"largest": list(range(n)), "smallest": list(range(n)), "difference": [x, y],
           "sum": [x, y, z] if level >= 3 else [x, y], "ratio": [x, y]}[ask_kind]
    if ask_kind == "sum" and level >= 5:
        use = list(range(n))
    reads = "The chart shows " + ", ".join(f"{labels[k]} = {values[k]}" for k in use) + "."
    names = [labels[k] for k in use]
    if ask_kind in ("largest", "smallest"):
        fn = "max" if ask_kind == "largest" else "min"
        steps = [Step(f"the {ask_kind} value", f"{fn}({', '.join(values)})")]
        ask = pick(rng, (f"What is the {ask_kind} value in the chart?",
                         f"Which number is the {ask_kind} among the bars? Give the value."))
        plan, summary = f"Take the {fn} of all bar values.", f"The {ask_kind} bar value is {{answer}}."
    elif ask_kind == "difference":
        steps = [Step("the difference", f"{values[x]} - {values[y]}")]
        ask = f"How much larger is {labels[x]} than {labels[y]} in the chart?"
        plan, summary = "Subtract the two bar values.", f"{labels[x]} minus {labels[y]}: {{answer}}."
    elif ask_kind == "sum":
        steps = [Step("the total", " + ".join(values[k] for k in use))]
        ask = (f"What is the total of all the bars?" if len(use) == n
               else f"What is the total of {', '.join(names[:-1])} and {names[-1]}?")
        plan, summary = "Add the bar values.", "Added the bars: {answer}."
    else:
        steps = [Step("the ratio", f"{values[x]} / {values[y]}")]
        ask = f"How many times larger is {labels[x]} than {labels[y]}?"
        plan, summary = "Divide the first bar value by the second.", f"{labels[x]} divided by {labels[y]}: {{answer}}."
    fig = draw_bar_chart(title, labels, values, style_rng(rng))
    record = {"kind": "chart", "title": title, "labels": labels, "values": values, "question": ask_kind,
              "bars_used": use}
    p = Problem(question="", kind=f"reading a bar chart ({ask_kind})",
                given=[], plan=plan, steps=steps, summary=summary)
    return _pictured(p, fig, ask, reads, record)


def _sides(rng: random.Random, level: int) -> tuple[str, str]:
    """Two leg lengths: scaled Pythagorean triples at levels 1-2, integers at 3, decimals at 4-5."""
    if level <= 2:
        a, b, _ = pick(rng, _TRIPLES)
        k = rng.randint(1, 2 if level == 1 else 4)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return str(a * k), str(b * k)
    if level == 3:
        return str(rng.randint(2, 30)), str(rng.randint(2, 30))
    return rand_decimal(rng, 1, 20 * level, 1), rand_decimal(rng, 1, 20 * level, 1)


def make_triangle_image(rng: random.Random, level: int, split: str) -> Problem:
    """Right triangle ABC (right angle at C), two sides labelled: find the third side, the area or angle A.

    Legs are a = BC and b = AC, the hypotenuse c = AB. Angle questions use the 30-60-90 and
    45-45-90 triangles, whose sine, cosine or tangent the plan names (the calculator has no
    inverse trigonometric functions).
    """
    unit = pick(rng, ("cm", "m", "in") if split == "train" else ("mm", "ft", "km"))
    ask_kind = pick(rng, ("hypotenuse", "leg", "area") + (("angle",) if level >= 2 else ()))
    a, b = _sides(rng, level)
    angle_mark = None
    legs = (float(a), float(b))  # BC, AC: the drawn shape
    if ask_kind == "hypotenuse":
        shown, unknown = {"a": a, "b": b}, "c"
        steps = [Step("the hypotenuse AB", f"sqrt({a}**2 + {b}**2)")]
        ask, plan = "How long is side AB?", "Pythagoras: AB = sqrt(BC^2 + AC^2)."
        summary, answer_unit = "Pythagoras on the two legs gives AB = {answer}.", unit
    elif ask_kind == "leg":
        if level <= 2:  # a scaled triple: the hypotenuse is a whole number
            c = str(round(math.hypot(int(a), int(b))))
        else:
            c = rand_decimal(rng, int(float(a)) + 1, int(float(a)) + 30, 0 if level == 3 else 1)
            legs = (float(a), (float(c) ** 2 - float(a) ** 2) ** 0.5)
        shown, unknown = {"a": a, "c": c}, "b"
        steps = [Step("the leg AC", f"sqrt({c}**2 - {a}**2)")]
        ask, plan = "How long is side AC?", "Pythagoras: AC = sqrt(AB^2 - BC^2)."
        summary, answer_unit = "Pythagoras with the hypotenuse and BC gives AC = {answer}.", unit
    elif ask_kind == "area":
        shown, unknown = {"a": a, "b": b}, None
        steps = [Step("the area", f"{a} * {b} / 2")]
        ask, plan = "What is the area of triangle ABC?", "Area = BC * AC / 2 (the legs are base and height)."
        summary, answer_unit = "Half the product of the legs: {answer}.", f"{unit}^2"
    else:
        s = a if level <= 3 else rand_decimal(rng, 1, 10 * level, 1)
        which = pick(rng, ("sin", "cos", "tan"))
        two_s = format_number(2 * Fraction(s))
        if which == "sin":  # BC opposite A is half the hypotenuse: A = 30
            shown, steps, degrees = {"a": s, "c": two_s}, [Step("sin A = BC / AB", f"{s} / {two_s}")], 30
            plan = "sin A = BC / AB; sin 30° = 0.5, sin 45° = 0.7071, sin 60° = 0.866."
            legs = (float(s), float(s) * 3 ** 0.5)
        elif which == "cos":  # AC next to A is half the hypotenuse: A = 60
            shown, steps, degrees = {"b": s, "c": two_s}, [Step("cos A = AC / AB", f"{s} / {two_s}")], 60
            plan = "cos A = AC / AB; cos 30° = 0.866, cos 45° = 0.7071, cos 60° = 0.5."
            legs = (float(s) * 3 ** 0.5, float(s))
        else:  # equal legs: A = 45
            shown, steps, degrees = {"a": s, "b": s}, [Step("tan A = BC / AC", f"{s} / {s}")], 45
            plan = "tan A = BC / AC; tan 30° = 0.5774, tan 45° = 1, tan 60° = 1.732."
            legs = (float(s), float(s))
        unknown, angle_mark = None, "?"
        ask = pick(rng, ("What is angle A in degrees?", "Find the size of angle A (in degrees)."))
        summary, answer_unit = f"From {which} A, angle A = {{answer}}.", "degrees"
    labels = {k: f"{v} {unit}" for k, v in shown.items()}
    if unknown:
        labels[unknown] = "?"
    fig = draw_right_triangle(labels, legs, style_rng(rng), angle_mark=angle_mark)
    names = {"a": "BC", "b": "AC", "c": "AB"}
    facts = [f"{names[k]} = {v} {unit}" for k, v in shown.items()]
    reads = "The triangle is right-angled at C, with " + " and ".join(facts)
    reads += f"; {names[unknown]} is marked ?." if unknown else ("; angle A is marked ?." if angle_mark else ".")
    record = {"kind": "triangle", "question": ask_kind, "sides": shown, "unit": unit}
    p = Problem(question="", kind=f"right triangle ({ask_kind})", given=[], plan=plan, steps=steps,
                unit=answer_unit, summary=summary, tolerance=1e-6,
                answer_template=str(degrees) if ask_kind == "angle" else "{r_last}")
    return _pictured(p, fig, ask, reads, record)


_READ_ASKS = ("What does the image say?", "Read the text in the picture.", "Copy what is written in the image.",
              "Write down exactly what the image shows.", "What is written here?")


def make_reading(rng: random.Random, level: int, split: str) -> Example:
    """The reading drill: a picture of a few numbers, or of an item and its price, read back verbatim.

    Reading is the skill under every rendered problem (its reasoning's first line copies the
    picture's values) and the one a tower trained only on whole problems never got: each problem
    is a few hundred tokens for one picture, and its answer hangs on the reading only through
    several steps. A drill is one picture and a dozen tokens, all of them read off it, drawn with
    the same renderer (fonts, sizes, colours, rotations) as the problems' text; like the copy
    drills it takes no tools and no reasoning effort.
    """
    if rng.random() < 0.7:
        text = ", ".join(random_number(rng, level) for _ in range(rng.randint(1, 1 + level // 2)))
    else:
        text = f"{pick(rng, _GOODS[split]).capitalize()}: ${_money(rng, level)}"
    fig = draw_text(text, style_rng(rng), level)
    question = f"{IMAGE_PLACEHOLDER}\n{pick(rng, _READ_ASKS)}"
    summary = "Read the image's text."
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": f"The image reads: {text}",
                 "content": f"Answer: {text}\nSummary: {summary}"}]
    figure = _figure_record(fig, {"kind": "reading", "text": text})
    meta = {"task": "image_read", "level": level, "answer": text, "summary": summary, "split": split,
            "tools": False, "answer_kind": "text", "tolerance": 0.0, "prompt_len": 2, "figure": figure}
    return Example(messages=messages, tools=[], meta=meta, images=[png_bytes(fig.image)])


def gallery(out: str | pathlib.Path, n: int = 12, seed: int = 0, split: str = "train") -> list[pathlib.Path]:
    """Writes `n` sample pictures (every kind, levels 1..5 in turn) and an ``index.md`` with their questions."""
    from train.synthetic.registry import SUITES, generate

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines, paths = ["# Rendered problems", ""], []
    tasks = SUITES["vision"] + SUITES["reading"]
    for i in range(n):
        task, level = tasks[i % len(tasks)], 1 + (i // len(tasks)) % 5
        ex = generate(task, level=level, seed=seed * 1000 + i, split=split)
        path = out / f"{i:02d}_{task}_L{level}.png"
        path.write_bytes(ex.images[0])
        paths.append(path)
        lines += [f"## {path.name}", "", f"Question: {ex.messages[1]['content']}".replace(IMAGE_PLACEHOLDER, "[image]"),
                  "", f"Answer: {ex.meta['answer']}", ""]
    (out / "index.md").write_text("\n".join(lines))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.synthetic.images",
                                     description="Save sample rendered problems (PNG) and their questions.")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--n", type=int, default=12, help="how many pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    for path in gallery(args.out, args.n, args.seed, args.split):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
