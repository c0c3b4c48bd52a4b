"""Multi-step word problems: one calculator call per step, each step using the previous result."""

import random

from train.synthetic.problem import Problem, Step, pick, rand_decimal

_NAMES = {
    "train": ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"),
    "heldout": ("Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yuki"),
}
_ITEMS = {
    "train": ("notebooks", "pens", "mugs", "tickets", "plants", "books"),
    "heldout": ("lamps", "candles", "scarves", "puzzles", "batteries", "posters"),
}


def _shopping(rng, level, split, name):
    n = rng.randint(2, 3 + 4 * level)
    price = rand_decimal(rng, 1, 5 * level * level, 2 if level >= 2 else 0)
    item = pick(rng, _ITEMS[split])
    bill = pick(rng, (50, 100, 200, 500, 1000, 2000))
    while n * float(price) * 1.3 > bill:
        bill *= 2
    steps = [Step(f"the cost of the {item}", f"{n} * {price}")]
    if level >= 3:
        tax = pick(rng, ("5", "6.5", "8", "10", "12.5"))
        steps.append(Step("the cost with tax", f"round({{r0}} * (100 + {tax}) / 100, 2)"))
        extra = f" Sales tax of {tax}% is added."
        given = [f"count = {n}", f"price = ${price}", f"tax = {tax}%", f"paid = ${bill}"]
    else:
        extra, given = "", [f"count = {n}", f"price = ${price}", f"paid = ${bill}"]
    steps.append(Step("the change", f"{bill} - {{r{len(steps) - 1}}}"))
    q = pick(rng, (
        "{name} buys {n} {item} at ${p} each and pays with ${bill}.{extra} How much change does {name} get?",
        "{n} {item} cost ${p} each.{extra} {name} hands over ${bill}. What is the change?",
        "{name} pays ${bill} for {n} {item} priced at ${p} apiece.{extra} How much money comes back?",
    ))
    question = q.format(name=name, n=n, item=item, p=price, bill=bill, extra=extra)
    return Problem(question=question, kind="word problem (shopping)", given=given,
                   plan="Multiply count by price" + (", add the tax (rounded to cents)" if level >= 3 else "")
                   + ", then subtract from the amount paid.",
                   steps=steps, unit="$", summary=f"Cost of the {item}, then ${bill} minus it: {{answer}} change.")


def _travel(rng, level, split, name):
    legs = 2 if level < 4 else 3
    speeds = [rng.randint(20, 40 + 30 * level) for _ in range(legs)]
    hours = [rand_decimal(rng, 1, 2 + level, 0 if level <= 2 else 1) for _ in range(legs)]
    steps = [Step(f"the distance of leg {i + 1}", f"{v} * {t}") for i, (v, t) in enumerate(zip(speeds, hours))]
    steps.append(Step("the total distance", " + ".join(f"{{r{i}}}" for i in range(legs))))
    parts = [f"{v} km/h for {t} hours" for v, t in zip(speeds, hours)]
    trip = ", then ".join(parts)
    q = pick(rng, ("{name} drives at {trip}. How far does {name} travel in total?",
                   "A train runs at {trip}. What total distance does it cover?",
                   "Starting out, {name} cycles at {trip}. Find the total distance."))
    return Problem(question=q.format(name=name, trip=trip), kind="word problem (distance)",
                   given=[f"leg {i + 1}: {v} km/h, {t} h" for i, (v, t) in enumerate(zip(speeds, hours))],
                   plan="Distance = speed * time for each leg, then add the legs.",
                   steps=steps, unit="km", summary="Added speed times time over the legs: {answer}.")


def _saving(rng, level, split, name):
    per = rand_decimal(rng, 5, 20 * level, 0 if level <= 2 else 2)
    weeks = rng.randint(3, 6 * level + 4)
    spend = rng.randint(1, 5 * level) * 10
    q = pick(rng, ("{name} saves ${s} every week for {w} weeks, then spends ${x} on a gift. How much is left?",
                   "Each week {name} puts ${s} aside. After {w} weeks, ${x} goes on a concert ticket. What remains?",
                   "Saving ${s} a week for {w} weeks and then spending ${x}: how much does {name} still have?"))
    steps = [Step("the amount saved", f"{per} * {weeks}"), Step("the amount left", f"{{r0}} - {spend}")]
    return Problem(question=q.format(name=name, s=per, w=weeks, x=spend), kind="word problem (savings)",
                   given=[f"weekly = ${per}", f"weeks = {weeks}", f"spent = ${spend}"],
                   plan="Multiply weekly savings by weeks, then subtract the spending.",
                   steps=steps, unit="$", summary="Savings times weeks, minus the spending: {answer} left.")


def _factory(rng, level, split, name):
    rate = rng.randint(10, 60 * level)
    hours = rng.randint(4, 12)
    days = rng.randint(2, 5 + 5 * level)
    steps = [Step("the units per day", f"{rate} * {hours}"), Step("the units in total", f"{{r0}} * {days}")]
    given = [f"rate = {rate} per hour", f"hours = {hours} per day", f"days = {days}"]
    text = "A machine makes {r} parts per hour and runs {h} hours a day. How many parts does it make in {d} days?"
    if level >= 3:
        boxes = pick(rng, (4, 5, 8, 10, 12, 20, 25))
        steps.append(Step("the full boxes", f"{{r1}} // {boxes}"))
        given.append(f"box size = {boxes}")
        text = ("A machine makes {r} parts per hour and runs {h} hours a day for {d} days. The parts are packed "
                f"in boxes of {boxes}. How many full boxes are there?")
    q = pick(rng, (text, text.replace("A machine", "A bakery oven").replace("parts", "loaves")))
    return Problem(question=q.format(r=rate, h=hours, d=days), kind="word problem (rates)", given=given,
                   plan="Multiply rate by hours, then by days" + (", then divide into whole boxes." if level >= 3 else "."),
                   steps=steps, summary="Multiplied the rate by hours and days: {answer}.")


_TEMPLATES = (_shopping, _travel, _saving, _factory)


def make_word_problem(rng: random.Random, level: int, split: str) -> Problem:
    """A 2-step (levels 1-2) or 3-step (levels 3-5) everyday problem with level-scaled numbers."""
    return pick(rng, _TEMPLATES)(rng, level, split, pick(rng, _NAMES[split]))
