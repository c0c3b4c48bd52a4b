"""Copy drills: the skill under every STEM answer, trained on its own.

Almost every number a STEM answer contains is copied: from the question into the tool call, from
the tool's result into the reasoning and the answer. A small model learns that copying (induction
heads: find where the current token occurred before and continue from there; and retrieval:
find the k-th number of the question) from a few hundred tokens of it per step in the problems
alone only slowly. A drill is short and almost all copying: a handful of numbers of the level's
sizes, asked back in the same or reverse order, or one of them by its position, with the same
reasoning scheme (``Task`` / ``Given`` / ``Plan``) and ``Answer`` / ``Summary`` lines as the
problems, and no tools (so no tools header).

The word drill (``make_word_copy``) is the same for words: function calling copies the words of
a request into a function's name and its arguments, and a held-out request's words are ones the
model never saw. Held-out calls read by hand came out re-spelled ("reerve" for "reserve", "mo
moly" for "modify") already where the reasoning copies the action from the request, while
numbers, drilled, are copied right. So the drill's words are never-seen strings of the same kinds:
made-up and common English words of the train split, fragments of them, letter strings,
capitalised names and upper-case codes; asked back as a list, reversed, one by position, as a
JSON list (the unspaced form a call's strings take) or joined into one snake_case name (a
request's words into a function's name).
"""

from __future__ import annotations

import json
import random

from train.synthetic.example import SYSTEM_PROMPT, Example
from train.synthetic.function_pool import HELDOUT_WORDS, fresh_word
from train.synthetic.problem import pick, rand_decimal, rand_digits

_ORD = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")  # k <= 2 + level <= 7


def random_number(rng: random.Random, level: int) -> str:
    """A number of the level's sizes: whole (1-4 digits at level 1 .. 6-14 at level 5) or a decimal."""
    lo, hi = ((1, 4), (2, 6), (3, 8), (4, 11), (6, 14))[level - 1]
    if rng.random() < 0.3:
        return rand_decimal(rng, 1, 10 ** rng.randint(1, min(hi, 6)), rng.randint(1, 3))
    return str(rand_digits(rng, rng.randint(lo, hi)))


def make_copy(rng: random.Random, level: int, split: str) -> Example:
    """One drill: repeat the numbers, reverse them, or name the k-th one."""
    k = rng.randint(2, 2 + level)
    nums = [random_number(rng, level) for _ in range(k)]
    return _ask_back(rng, "copy", level, split, nums, "number", ("repeat", "reverse", "pick"))


def _ask_back(rng: random.Random, task: str, level: int, split: str, items: list[str], noun: str,
              forms: tuple[str, ...]) -> Example:
    """A drill on `items` (each a `noun`: number or word) in one of `forms`: repeat them, reverse
    them, name the k-th one, write them as a JSON list (quote) or join them into one snake_case
    name (join: a request's words into a function's name, "archive the parcel" -> archive_parcel)."""
    listed = ", ".join(items)
    kind = pick(rng, forms)
    if kind == "repeat":
        question = pick(rng, (f"Copy these {noun}s exactly: {{l}}.", "Repeat after me: {l}.",
                              f"Write these {noun}s back: {{l}}.")).format(l=listed)
        answer, plan = listed, f"Write the {noun}s in the same order."
    elif kind == "reverse":
        question = pick(rng, (f"Write these {noun}s in reverse order: {{l}}.", "Reverse this list: {l}.")
                        ).format(l=listed)
        answer, plan = ", ".join(reversed(items)), f"Write the {noun}s from last to first."
    elif kind == "pick":
        i = rng.randrange(len(items))
        question = pick(rng, (f"Which is the {{o}} {noun} in {{l}}?", f"In the list {{l}}, what is the {{o}} {noun}?")
                        ).format(o=_ORD[i], l=listed)
        answer, plan = items[i], f"Take {noun} {i + 1} of the list."
    elif kind == "quote":
        question = pick(rng, (f"Write these {noun}s as a JSON list: {{l}}.", f"Quote each of these {noun}s: {{l}}.")
                        ).format(l=listed)
        answer, plan = json.dumps(items), f"Write each {noun} in quotes, in order."
    else:
        items = items[:3]
        question = pick(rng, (f"Join these {noun}s into one name: {{s}}.", "Make a snake_case name of: {s}.")
                        ).format(s=" ".join(items))
        answer, plan = "_".join(x.lower() for x in items), f"Join the {noun}s with underscores, in lower case."
    given = "; ".join(f"{noun[0]}{j + 1} = {x}" for j, x in enumerate(items))
    reasoning = f"Task: copy.\nGiven: {given}.\nPlan: {plan}\nSo the answer is {answer}."
    summary = f"Read the {_ORD[i]} {noun}: {answer}." if kind == "pick" else f"Copied {len(items)} {noun}s."
    return drill_example(task, level, split, question, reasoning, answer, summary)


# English letter frequencies (per mille, rounded), for letter strings that cut into the short
# pieces no word list reaches.
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_WEIGHTS = (127, 91, 82, 75, 70, 67, 63, 61, 60, 43, 40, 28, 28, 24, 24, 22, 20, 20, 19, 15, 10, 8, 2, 2, 1, 1)
_WORD_FORMS = ("repeat", "reverse", "pick", "quote", "join")


def _letters(rng: random.Random) -> str:
    return "".join(rng.choices(_LETTERS, _LETTER_WEIGHTS, k=rng.randint(3, 8)))


def _fragment(rng: random.Random) -> str:
    """A piece of a train-split word (``"nvel"`` of "envelope"): the pieces inside words, which
    whole words seldom make the model write."""
    word = fresh_word(rng, pick(rng, ("noun", "verb")))
    n = rng.randint(2, max(2, len(word) - 1))
    i = rng.randint(0, len(word) - n)
    return word[i:i + n]


def drill_word(rng: random.Random) -> str:
    """A word to copy: a train-split function word (made up or common English, sometimes
    inflected), one or two fragments of such words, a string of letters, or a capitalised name or
    upper-case code made of those; never a held-out word."""
    while True:
        r = rng.random()
        if r < 0.4:
            word = fresh_word(rng, pick(rng, ("noun", "verb")))
        elif r < 0.8:
            word = "".join(_fragment(rng) for _ in range(rng.randint(1, 2)))
        else:
            word = _letters(rng)
        if rng.random() < 0.25:
            word = word.upper()[:rng.randint(2, 4)] if rng.random() < 0.3 else word.capitalize()
        if word.lower() not in HELDOUT_WORDS:
            return word


def make_word_copy(rng: random.Random, level: int, split: str) -> Example:
    """One word drill: repeat the words, reverse them, name the k-th one, write them as a JSON list
    or join them into one snake_case name."""
    k = rng.randint(2, 2 + level)
    words = [drill_word(rng) for _ in range(k)]
    return _ask_back(rng, "words", level, split, words, "word", _WORD_FORMS)


def drill_example(task: str, level: int, split: str, question: str, reasoning: str, answer: str,
                  summary: str) -> Example:
    """A drill as a conversation: the question, one reasoning and the Answer / Summary lines; no
    tools, checked as exact text."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": reasoning,
                 "content": f"Answer: {answer}\nSummary: {summary}"}]
    meta = {"task": task, "level": level, "answer": answer, "summary": summary, "split": split,
            "tools": False, "answer_kind": "text", "tolerance": 0.0, "prompt_len": 2}
    return Example(messages=messages, tools=[], meta=meta)
