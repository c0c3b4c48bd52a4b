"""Random functions for function-calling data: names, JSON schemas, argument values, requests.

A function is ``<verb>_<object>`` with 1..5 typed parameters. The train and held-out splits draw
from disjoint vocabularies (verbs, objects, parameter names and string values), so the held-out
evaluation calls functions whose names and schemas never appeared in training. Requests name the
verb, the object and every argument in words, so the call can be copied from the request: this is
what a tiny model can learn, and what transfers to unseen schemas.

A fixed train vocabulary is memorised, not copied: a model that has seen only a dozen verbs writes
one of them for an unseen one. So half of the train split's words (verbs, objects, parameter
names, enum and string values) are drawn afresh for each function (`fresh_word`: half the time
a made-up word, `invented_word`, pronounceable, and half the time a common English word from
``lexicon.py``; never a held-out word); the only way to get those right is to copy them, and
between them they make the model write the tokenizer's pieces of real English words too.
"""

import dataclasses
import random
from typing import Any

from train.synthetic import lexicon
from train.synthetic.problem import pick

VERBS = {
    "train": ("get", "book", "send", "create", "cancel", "search", "update", "check", "list", "schedule",
              "translate", "track"),
    "heldout": ("fetch", "reserve", "dispatch", "register", "revoke", "find", "modify", "verify", "browse",
                "plan", "compute", "archive"),
}
OBJECTS = {
    "train": ("weather", "flight", "email", "invoice", "stock_price", "hotel", "meeting", "reminder",
              "playlist", "order", "ticket", "recipe", "account", "package", "taxi", "news"),
    "heldout": ("forecast", "train_seat", "message", "receipt", "share_quote", "apartment", "appointment",
                "alarm", "podcast", "shipment", "voucher", "menu", "profile", "parcel", "ride", "headline"),
}
_CITIES = {
    "train": ("Paris", "Rome", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Madrid", "Seoul", "Dublin"),
    "heldout": ("Berlin", "Nairobi", "Quito", "Hanoi", "Perth", "Lisbon", "Austin", "Krakow", "Manila", "Tunis"),
}
_PEOPLE = {
    "train": ("Alice", "Bruno", "Carmen", "Dmitri", "Esther", "Farid", "Greta", "Hugo"),
    "heldout": ("Ingrid", "Jonas", "Keiko", "Luis", "Mirela", "Nadia", "Oskar", "Paula"),
}
_NOTES = {
    "train": ("window seat", "ring twice", "no onions", "after lunch", "call first", "gift wrap"),
    "heldout": ("aisle seat", "leave at door", "extra spicy", "before noon", "text first", "fragile"),
}


# The share of train-split words invented afresh instead of drawn from the lists above.
INVENTED_RATE = 0.5
# English-like syllables (onset, vowel, coda), some closed by a silent e ("pute", "vole"), and
# English prefixes and suffixes around them, so that the tokenizer's pieces of unseen real words
# ("com" "pute", "a" "par" "t" "ment", "arch" "ive") occur in training as pieces of invented ones.
# Plain syllables alone left an eighth of the held-out function-calling targets (suffixes such as
# "ment", "ance", "ive", "ard") almost never trained as outputs, and those were the pieces a
# held-out call garbled.
_ONSETS = ("", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w",
           "y", "z", "br", "cr", "dr", "fr", "gr", "pr", "tr", "bl", "cl", "fl", "gl", "pl", "sl", "sc", "sk",
           "sm", "sn", "sp", "st", "sw", "ch", "sh", "th", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "y", "ai", "au", "ea", "ee", "ie", "oa", "oo", "ou")
_CODAS = ("", "", "", "", "b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "x", "ng", "nd",
          "nt", "st", "rt", "ck", "ll", "ss", "sh", "ch", "th")
_SILENT_E_CODAS = ("b", "c", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_PREFIXES = ("re", "un", "in", "im", "dis", "en", "non", "pre", "pro", "con", "com", "de", "ex", "sub", "super",
             "trans", "inter", "over", "under", "mis", "anti", "auto", "co", "fore", "out", "post", "semi", "tele",
             "tri", "up", "ad", "ab", "per", "ac", "al", "ap", "at", "be", "for", "with", "back", "air", "sea")
_SUFFIXES = ("ment", "tion", "sion", "ation", "ness", "ity", "ous", "ful", "less", "able", "ible", "al", "ial",
             "ance", "ence", "ant", "ent", "ard", "ure", "ist", "ism", "ive", "ize", "ify", "ate", "ite", "ine",
             "ile", "ute", "ote", "ade", "ide", "ode", "age", "ary", "ery", "ory", "ly", "er", "or", "ar",
             "ing", "ed", "en", "est", "ic", "ical", "ish", "ship", "hood", "dom", "ward", "ee", "et", "ow", "ey",
             "el", "le", "on", "ot", "ut", "us", "um", "ia", "o", "y")


def _syllable(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return pick(rng, _ONSETS) + pick(rng, "aeiou") + pick(rng, _SILENT_E_CODAS) + "e"
    return pick(rng, _ONSETS) + pick(rng, _VOWELS) + pick(rng, _CODAS)


def invented_word(rng: random.Random) -> str:
    """A pronounceable made-up lowercase word (``"droskel"``, ``"conbrakment"``): an optional English
    prefix, 1 to 3 syllables and an optional suffix; never a held-out word."""
    while True:
        prefix = pick(rng, _PREFIXES) if rng.random() < 0.3 else ""
        core = "".join(_syllable(rng) for _ in range(pick(rng, (1, 1, 2, 2, 3))))
        suffix = pick(rng, _SUFFIXES) if rng.random() < 0.4 else ""
        word = prefix + core + suffix
        if 3 <= len(word) <= 14 and word not in HELDOUT_WORDS:
            return word


def inflect(word: str, part: str, rng: random.Random) -> str:
    """`word` as a plural (a noun) or with -s, -ed, -ing or -er (a verb), by the plain spelling rules."""
    ending = "s" if part == "noun" else pick(rng, ("s", "ed", "ing", "er"))
    if ending == "s":
        if word.endswith(("s", "x", "z", "ch", "sh")):
            return word + "es"
        return word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"
    if word.endswith("e"):
        word = word[:-1]
    elif word.endswith("y") and word[-2:-1] not in "aeiou" and ending != "ing":
        word = word[:-1] + "i"
    return word + ending


def fresh_word(rng: random.Random, part: str = "noun") -> str:
    """A train-split word never in the lists above: made up or, as often, a common English `part`
    of speech ("noun" or "verb") from ``lexicon.py``, a third of those inflected; never a held-out
    word."""
    if rng.random() < 0.5:
        return invented_word(rng)
    word = pick(rng, _ENGLISH[part])
    if rng.random() < 1 / 3 and (bent := inflect(word, part, rng)) not in HELDOUT_WORDS:
        return bent
    return word


def _invented_name(rng: random.Random) -> str:
    return fresh_word(rng).capitalize()


def _ticker(rng: random.Random) -> str:
    return "".join(chr(65 + rng.randrange(26)) for _ in range(rng.randint(2, 4)))


def _date(rng: random.Random) -> str:
    return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _code(rng: random.Random) -> str:
    return f"{chr(65 + rng.randrange(26))}{chr(65 + rng.randrange(26))}-{rng.randint(100, 9999)}"


# (name, kind, value source): kind is string | integer | number | boolean | enum.
PARAMS: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "train": (
        ("city", "string", "cities"), ("destination", "string", "cities"), ("date", "string", _date),
        ("symbol", "string", _ticker), ("recipient", "string", "people"), ("order_id", "string", _code),
        ("quantity", "integer", (1, 20)), ("nights", "integer", (1, 14)), ("max_price", "number", (10, 900)),
        ("currency", "enum", ("USD", "EUR", "GBP", "JPY")), ("unit", "enum", ("celsius", "fahrenheit")),
        ("seat_class", "enum", ("economy", "business", "first")), ("priority", "enum", ("low", "normal", "high")),
        ("urgent", "boolean", None), ("note", "string", "notes"), ("guests", "integer", (1, 8)),
    ),
    "heldout": (
        ("town", "string", "cities"), ("arrival_city", "string", "cities"), ("day", "string", _date),
        ("ticker", "string", _ticker), ("contact", "string", "people"), ("reference", "string", _code),
        ("count", "integer", (1, 20)), ("duration_days", "integer", (1, 14)), ("budget", "number", (10, 900)),
        ("money_code", "enum", ("CHF", "CAD", "AUD", "INR")), ("scale", "enum", ("metric", "imperial")),
        ("cabin", "enum", ("standard", "premium", "suite")), ("importance", "enum", ("minor", "major", "critical")),
        ("express", "boolean", None), ("comment", "string", "notes"), ("travellers", "integer", (1, 8)),
    ),
}


# Every word of the held-out vocabulary: names, parameter names, enum and string values.
HELDOUT_WORDS = frozenset(
    w for pool in (VERBS["heldout"], OBJECTS["heldout"]) for name in pool for w in name.split("_")
) | frozenset(w.lower() for pool in (_CITIES, _PEOPLE, _NOTES) for v in pool["heldout"] for w in v.split()) | frozenset(
    w.lower() for name, kind, source in PARAMS["heldout"]
    for w in name.split("_") + (list(source) if kind == "enum" else []))
# The English words drawn for the train split: the lexicon less the held-out vocabulary.
_ENGLISH = {"verb": tuple(w for w in lexicon.VERBS if w not in HELDOUT_WORDS),
            "noun": tuple(w for w in lexicon.NOUNS if w not in HELDOUT_WORDS)}


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter: its name, JSON type (or "enum") and where its values come from."""

    name: str
    kind: str
    source: Any


@dataclasses.dataclass(frozen=True)
class Function:
    """A random function ``<verb>_<object>`` with its parameters; the first `required` are required."""

    verb: str
    obj: str
    params: tuple[Param, ...]
    required: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.verb}_{self.obj}"

    @property
    def action(self) -> str:
        """The request's wording: ``"book the hotel"``."""
        return f"{self.verb} the {self.obj.replace('_', ' ')}"

    def schema(self) -> dict[str, Any]:
        """The tool entry: ``{"type": "function", "function": {name, description, parameters}}``."""
        props = {}
        for p in self.params:
            words = p.name.replace("_", " ")
            if p.kind == "enum":
                props[p.name] = {"type": "string", "enum": list(p.source), "description": f"The {words}."}
            elif p.kind == "integer":
                lo, hi = p.source
                props[p.name] = {"type": "integer", "minimum": lo, "maximum": hi, "description": f"The {words}."}
            elif p.kind == "number":
                props[p.name] = {"type": "number", "minimum": 0, "description": f"The {words}."}
            else:
                props[p.name] = {"type": p.kind, "description": f"The {words}."}
        desc = f"{self.verb.capitalize()} the {self.obj.replace('_', ' ')}."
        return {"type": "function", "function": {
            "name": self.name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": list(self.required),
                           "additionalProperties": False}}}


def _invented(rng: random.Random, split: str) -> bool:
    return split == "train" and rng.random() < INVENTED_RATE


def _invented_param(rng: random.Random, taken: set[str]) -> Param:
    """A parameter with an invented name (one or two words) and a random kind."""
    while True:
        name = "_".join(fresh_word(rng) for _ in range(rng.choice((1, 1, 2))))
        if name not in taken:
            break
    kind = pick(rng, ("string", "string", "enum", "integer", "number", "boolean"))
    if kind == "string":
        return Param(name, kind, _invented_name)
    if kind == "enum":
        values, n = [], rng.randint(2, 4)
        while len(values) < n:
            if (v := fresh_word(rng)) not in values:
                values.append(v)
        return Param(name, kind, tuple(values))
    if kind == "integer":
        lo = rng.randint(0, 10)
        return Param(name, kind, (lo, lo + rng.randint(5, 50)))
    if kind == "number":
        return Param(name, kind, (10, 900))
    return Param(name, kind, None)


def random_function(rng: random.Random, split: str, n_params: int, *, avoid: set[str] = frozenset()) -> Function:
    """A function whose name is not in `avoid`, with `n_params` parameters (the first required)."""
    while True:
        verb = fresh_word(rng, "verb") if _invented(rng, split) else pick(rng, VERBS[split])
        obj = fresh_word(rng) if _invented(rng, split) else pick(rng, OBJECTS[split])
        if f"{verb}_{obj}" not in avoid:
            break
    params = [Param(*p) for p in rng.sample(PARAMS[split], n_params)]
    for i in range(n_params):
        if _invented(rng, split):
            params[i] = _invented_param(rng, {q.name for q in params})
    params = tuple(params)
    n_req = rng.randint(1, n_params)
    return Function(verb, obj, params, tuple(p.name for p in params[:n_req]))


def random_value(rng: random.Random, p: Param, split: str) -> Any:
    """A value satisfying `p`'s schema."""
    if p.kind == "boolean":
        return rng.random() < 0.5
    if p.kind == "enum":
        return pick(rng, p.source)
    if p.kind == "integer":
        return rng.randint(*p.source)
    if p.kind == "number":
        places = rng.randint(0, 2)
        x = round(rng.uniform(*p.source), places)
        return int(x) if places == 0 else x
    if callable(p.source):
        return p.source(rng)
    if _invented(rng, split):  # a name never seen before, to be copied
        return " ".join(fresh_word(rng) for _ in range(2)) if p.source == "notes" else _invented_name(rng)
    return pick(rng, {"cities": _CITIES, "people": _PEOPLE, "notes": _NOTES}[p.source][split])


def random_arguments(rng: random.Random, f: Function, split: str, *, optional_rate: float) -> dict[str, Any]:
    """Arguments for `f`: every required parameter, each optional one with `optional_rate`."""
    return {p.name: random_value(rng, p, split) for p in f.params
            if p.name in f.required or rng.random() < optional_rate}


def value_text(v: Any) -> str:
    """How an argument value is written in a request: numbers and words as-is, booleans as words."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and " " in v:
        return f'"{v}"'
    return str(v)


def clauses(args: dict[str, Any]) -> str:
    """``{"city": "Paris", "nights": 3} -> "city Paris and nights 3"``."""
    parts = [f"{k.replace('_', ' ')} {value_text(v)}" for k, v in args.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_ASK = (
    "Please {a} with {c}.", "Can you {a}? Use {c}.", "I'd like you to {a} for {c}.", "{A}: {c}.",
    "Could you {a} with {c}, please?", "{A} using {c}.", "I need to {a}, {c}.",
)


def request(rng: random.Random, f: Function, args: dict[str, Any]) -> str:
    """A user request for one call; the action and every argument appear in the text."""
    if not args:
        return pick(rng, ("Please {a}.", "Can you {a}?", "{A}, please.")).format(a=f.action, A=f.action.capitalize())
    return pick(rng, _ASK).format(a=f.action, A=f.action.capitalize(), c=clauses(args))
