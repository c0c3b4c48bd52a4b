"""Units and quantities: the conversion table the tasks draw from, and the parser answers go through.

Every unit belongs to one dimension and has a factor to that dimension's base unit (temperatures
are affine and handled apart). The checker uses the same table, so an answer given in another unit
of the right dimension (``0.5 km`` for ``500 m``) is converted before it is compared.
"""

import re
from fractions import Fraction

# dimension -> {unit: factor to the dimension's base unit}
UNITS: dict[str, dict[str, Fraction]] = {
    "length": {"mm": Fraction(1, 1000), "cm": Fraction(1, 100), "m": Fraction(1), "km": Fraction(1000),
               "in": Fraction(254, 10000), "ft": Fraction(3048, 10000), "yd": Fraction(9144, 10000),
               "mi": Fraction(1609344, 1000)},
    "mass": {"mg": Fraction(1, 1000), "g": Fraction(1), "kg": Fraction(1000), "t": Fraction(1000000),
             "oz": Fraction(28349523125, 10**9), "lb": Fraction(45359237, 10**5)},
    "time": {"ms": Fraction(1, 1000), "s": Fraction(1), "min": Fraction(60), "h": Fraction(3600),
             "day": Fraction(86400)},
    "volume": {"mL": Fraction(1, 1000), "L": Fraction(1), "m^3": Fraction(1000), "gal": Fraction(3785411784, 10**9)},
    "speed": {"m/s": Fraction(1), "km/h": Fraction(1000, 3600), "mph": Fraction(1609344, 3600000)},
    "data": {"B": Fraction(1), "KB": Fraction(1000), "MB": Fraction(10**6), "GB": Fraction(10**9),
             "KiB": Fraction(1024), "MiB": Fraction(1024**2), "GiB": Fraction(1024**3)},
    "acceleration": {"m/s^2": Fraction(1)},
    "voltage": {"mV": Fraction(1, 1000), "V": Fraction(1), "kV": Fraction(1000)},
    "current": {"mA": Fraction(1, 1000), "A": Fraction(1)},
    "resistance": {"ohm": Fraction(1), "kohm": Fraction(1000)},
    "power": {"mW": Fraction(1, 1000), "W": Fraction(1), "kW": Fraction(1000)},
    "energy": {"J": Fraction(1), "kJ": Fraction(1000)},
    "force": {"N": Fraction(1), "kN": Fraction(1000)},
    "amount": {"mmol": Fraction(1, 1000), "mol": Fraction(1)},
    "molar_mass": {"g/mol": Fraction(1)},
    "percent": {"%": Fraction(1)},
    "money": {"$": Fraction(1)},
    "count": {"ways": Fraction(1), "arrangements": Fraction(1)},
}

TEMPERATURES = ("°C", "°F", "K")

UNIT_NAMES = {
    "mm": "millimeters", "cm": "centimeters", "m": "meters", "km": "kilometers", "in": "inches",
    "ft": "feet", "yd": "yards", "mi": "miles", "mg": "milligrams", "g": "grams", "kg": "kilograms",
    "t": "tonnes", "oz": "ounces", "lb": "pounds", "ms": "milliseconds", "s": "seconds",
    "min": "minutes", "h": "hours", "day": "days", "mL": "milliliters", "L": "liters",
    "m^3": "cubic meters", "gal": "US gallons", "m/s": "meters per second",
    "km/h": "kilometers per hour", "mph": "miles per hour", "B": "bytes", "KB": "kilobytes",
    "MB": "megabytes", "GB": "gigabytes", "KiB": "kibibytes", "MiB": "mebibytes", "GiB": "gibibytes",
    "°C": "degrees Celsius", "°F": "degrees Fahrenheit", "K": "kelvin",
}

_ALIASES = {
    "ohms": "ohm", "Ω": "ohm", "kΩ": "kohm", "kohms": "kohm", "dollars": "$", "percent": "%",
    "C": "°C", "F": "°F", "degC": "°C", "degF": "°F", "ºC": "°C", "ºF": "°F", "l": "L", "ml": "mL",
    "sec": "s", "hr": "h", "hrs": "h", "days": "day", "m/s²": "m/s^2", "m³": "m^3", "kmh": "km/h",
    "kph": "km/h", "secs": "s", "mins": "min", "way": "ways",
}
_ALIASES.update({name: unit for unit, name in UNIT_NAMES.items()})

_DIMENSION = {unit: dim for dim, table in UNITS.items() for unit in table}
_DIMENSION.update({u: "temperature" for u in TEMPERATURES})

_NUMBER = r"[-+−]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?"
_QUANTITY = re.compile(rf"([-−]\s*(?=\$))?(\$\s*)?({_NUMBER})\s*([A-Za-z°ºΩ%²³][A-Za-z°ºΩ%/²³]*(?:\^\d)?(?:[ /][A-Za-z]+)*)?")


def canonical_unit(unit: str) -> str | None:
    """The table's spelling of `unit` (``"ohms" -> "ohm"``), or None when it is not a unit."""
    unit = unit.strip().rstrip(".")
    if unit in _DIMENSION:
        return unit
    if unit in _ALIASES:
        return _ALIASES[unit]
    lowered = unit.lower()
    for alias, canon in _ALIASES.items():
        if alias.lower() == lowered:
            return canon
    return None


def dimension(unit: str) -> str | None:
    """The dimension of `unit` or None when unknown."""
    canon = canonical_unit(unit)
    return None if canon is None else _DIMENSION[canon]


def to_kelvin(value: Fraction, unit: str) -> Fraction:
    """Converts a temperature to kelvin."""
    if unit == "°C":
        return value + Fraction(27315, 100)
    if unit == "°F":
        return (value - 32) * Fraction(5, 9) + Fraction(27315, 100)
    return value


def convert(value: Fraction, src: str, dst: str) -> Fraction:
    """Converts `value` from unit `src` to unit `dst` (same dimension), exactly."""
    a, b = canonical_unit(src), canonical_unit(dst)
    if a is None or b is None or _DIMENSION[a] != _DIMENSION[b]:
        raise ValueError(f"cannot convert {src!r} to {dst!r}")
    if _DIMENSION[a] == "temperature":
        k = to_kelvin(value, a)
        if b == "°C":
            return k - Fraction(27315, 100)
        if b == "°F":
            return (k - Fraction(27315, 100)) * Fraction(9, 5) + 32
        return k
    table = UNITS[_DIMENSION[a]]
    return value * table[a] / table[b]


def parse_number(text: str) -> Fraction:
    """Parses ``"1,234.5"``, ``"-3e4"`` or ``"7/3"`` into an exact Fraction."""
    text = text.replace(",", "").replace("−", "-").strip()
    return Fraction(text)


def format_quantity(value: str, unit: str) -> str:
    """Joins a number and its unit the way answers are written: ``$12.5``, ``40%``, ``3.2 m``."""
    if unit == "$":
        return f"-${value[1:]}" if value.startswith("-") else f"${value}"
    if unit in ("%", ""):
        return f"{value}{unit}"
    return f"{value} {unit}"


def find_quantities(text: str) -> list[tuple[Fraction, str | None]]:
    """All numbers in `text` with the unit written right after (or a leading ``$``)."""
    found = []
    for m in _QUANTITY.finditer(text):
        try:
            value = parse_number(m.group(3))
        except (ValueError, ZeroDivisionError):
            continue
        if m.group(1):
            value = -value
        unit = "$" if m.group(2) else None
        if unit is None and m.group(4):
            words = m.group(4).split(" ")
            # The longest run of words that is a known unit: "meters per second" before "meters".
            for k in range(len(words), 0, -1):
                unit = canonical_unit(" ".join(words[:k]))
                if unit is not None:
                    break
        found.append((value, unit))
    return found
