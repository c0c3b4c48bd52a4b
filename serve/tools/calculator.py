"""The `calculator` tool: exact arithmetic on an expression string, without `eval`.

The expression is parsed with `ast` and walked by a small evaluator that only knows numbers,
arithmetic operators and a fixed set of functions and constants. Rational arithmetic is exact
(`fractions.Fraction`), so ``0.1 + 0.2`` is ``0.3`` and huge integers stay exact; functions whose
results are irrational (``sqrt(2)``, ``sin``, ``log``) fall back to floats. Sizes are bounded (the
expression's length, its node count, the digits of every intermediate number, exponents and
factorials) so that no expression can tie up the server: ``10**10**10`` is refused, not computed.

Formatting of results: integers in full; terminating decimals exactly up to 400 characters
(``0.3``; ``2.5e-7`` is ``0.00000025``); other rationals and floats to 12 significant digits with
trailing zeros dropped.

Deliberate choices: ``log(x)`` is base 10 as on a pocket calculator (``ln`` is natural, ``log(x, b)``
any base); ``round`` rounds halves away from zero (``round(2.5) == 3``), not to even; ``^`` is
refused with a hint, because in Python syntax it is XOR and binds looser than ``+``.
"""

import ast
import decimal
import math
import threading
from fractions import Fraction
from typing import Callable

MAX_EXPRESSION_CHARS = 2000
MAX_NODES = 400
MAX_DIGITS = 1000  # Numerators and denominators of every intermediate result.
MAX_FACTORIAL = 1000
SIGNIFICANT_DIGITS = 12

Number = Fraction | float

_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _digits(n: int) -> int:
    # bit_length is O(1); log10(2) ~ 0.30103 gives the decimal digit count to within one.
    return int(abs(n).bit_length() * 0.30103) + 1


def _check_size(x: Number) -> Number:
    if isinstance(x, Fraction):
        if _digits(x.numerator) > MAX_DIGITS or _digits(x.denominator) > MAX_DIGITS:
            raise ValueError(f"number too large: more than {MAX_DIGITS} digits")
        return x
    if math.isnan(x):
        raise ValueError("result is not a number")
    if math.isinf(x):
        raise ValueError("result overflows")
    return x


def _as_float(x: Number) -> float:
    try:
        return float(x)
    except OverflowError:
        raise ValueError("number too large for a floating-point function") from None


def _as_int(x: Number, what: str) -> int:
    if isinstance(x, Fraction) and x.denominator == 1:
        return x.numerator
    if isinstance(x, float) and x.is_integer():
        return int(x)
    raise ValueError(f"{what} needs an integer, got {format_number(x)}")


def _exact_sqrt(x: Fraction) -> Fraction | None:
    rn, rd = math.isqrt(x.numerator), math.isqrt(x.denominator)
    if rn * rn == x.numerator and rd * rd == x.denominator:
        return Fraction(rn, rd)
    return None


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ValueError("sqrt of a negative number")
    if isinstance(x, Fraction):
        exact = _exact_sqrt(x)
        if exact is not None:
            return exact
    return math.sqrt(_as_float(x))


def _log(x: Number, base: Number | None = None) -> Number:
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise ValueError("log needs a positive argument and a positive base other than 1")
    b = Fraction(10) if base is None else base
    if isinstance(x, Fraction) and isinstance(b, Fraction) and b.denominator == 1 and b > 1:
        # Exact answers for exact powers, so that log(1000) is 3 and not 2.9999999999999996.
        n, k = x, 0
        while n.denominator == 1 and n.numerator % b.numerator == 0 and n > 1:
            n, k = n / b, k + 1
        if n == 1:
            return Fraction(k)
    if isinstance(x, Fraction) and _digits(x.numerator) > 300:
        return (math.log(x.numerator) - math.log(x.denominator)) / math.log(_as_float(b))
    return math.log(_as_float(x)) / math.log(_as_float(b))


def _ln(x: Number) -> Number:
    if x <= 0:
        raise ValueError("ln needs a positive argument")
    if x == 1:
        return Fraction(0)
    return math.log(_as_float(x))


def _exp(x: Number) -> Number:
    if x == 0:
        return Fraction(1)
    if x > 2000:
        raise ValueError("exp argument too large")
    return math.exp(_as_float(x))


def _round(x: Number, ndigits: Number | None = None) -> Number:
    n = 0 if ndigits is None else _as_int(ndigits, "round's digits")
    if not -MAX_DIGITS <= n <= MAX_DIGITS:
        raise ValueError("round's digits out of range")
    q = Fraction(x)  # Exact even for floats: rounds the float's true value.
    scaled = q * Fraction(10) ** n
    # Half away from zero, the rule people expect from a calculator.
    r = math.floor(abs(scaled) + Fraction(1, 2)) * (1 if scaled >= 0 else -1)
    # An exact result even for a float input, so round(sqrt(2), 3) prints as 1.414.
    return Fraction(r) / Fraction(10) ** n


def _factorial(x: Number) -> Number:
    n = _as_int(x, "factorial")
    if not 0 <= n <= MAX_FACTORIAL:
        raise ValueError(f"factorial needs an integer between 0 and {MAX_FACTORIAL}")
    return Fraction(math.factorial(n))


def _comb_args(name: str, n: Number, k: Number) -> tuple[int, int]:
    ni, ki = _as_int(n, name), _as_int(k, name)
    if ni < 0 or ki < 0:
        raise ValueError(f"{name} needs non-negative integers")
    if ni > 100_000:
        raise ValueError(f"{name} argument too large")
    return ni, ki


def _comb(n: Number, k: Number) -> Number:
    return Fraction(math.comb(*_comb_args("comb", n, k)))


def _perm(n: Number, k: Number) -> Number:
    return Fraction(math.perm(*_comb_args("perm", n, k)))


def _trig(f: Callable[[float], float]) -> Callable[[Number], Number]:
    def g(x: Number) -> Number:
        if x == 0 and f is not math.cos:
            return Fraction(0)
        return f(_as_float(x))

    return g


def _minmax(f):
    def g(*xs: Number) -> Number:
        if not xs:
            raise ValueError(f"{f.__name__} needs at least one argument")
        return f(xs)

    return g


# name -> (function, min args, max args)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (_sqrt, 1, 1),
    "sin": (_trig(math.sin), 1, 1),
    "cos": (_trig(math.cos), 1, 1),
    "tan": (_trig(math.tan), 1, 1),
    "log": (_log, 1, 2),
    "log10": (lambda x: _log(x, Fraction(10)), 1, 1),
    "log2": (lambda x: _log(x, Fraction(2)), 1, 1),
    "ln": (_ln, 1, 1),
    "exp": (_exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_minmax(min), 1, 64),
    "max": (_minmax(max), 1, 64),
    "factorial": (_factorial, 1, 1),
    "comb": (_comb, 2, 2),
    "perm": (_perm, 2, 2),
}

_BINOPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}


def _power(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
        e = b.numerator
        if a == 0 and e < 0:
            raise ValueError("division by zero")
        if a in (0, 1, -1):
            return a**e
        # Digits of the result grow like |e| * digits(base): refuse before computing.
        size = max(_digits(a.numerator), _digits(a.denominator))
        if abs(e) * max(size - 1, math.log10(max(abs(a), 1 / abs(a)))) > MAX_DIGITS:
            raise ValueError(f"power too large: more than {MAX_DIGITS} digits")
        return a**e
    if isinstance(b, Fraction) and b.denominator == 2 and isinstance(a, Fraction) and a >= 0:
        root = _exact_sqrt(a)
        if root is not None:
            return _power(root, Fraction(b.numerator))
    fa, fb = _as_float(a), _as_float(b)
    if fa < 0 and not fb.is_integer():
        raise ValueError("fractional power of a negative number")
    if fa == 0 and fb < 0:
        raise ValueError("division by zero")
    try:
        return math.pow(fa, fb)
    except OverflowError:
        raise ValueError("result overflows") from None


def _binop(op: str, a: Number, b: Number) -> Number:
    if op == "**":
        return _power(a, b)
    if op in ("/", "//", "%") and b == 0:
        raise ValueError("division by zero")
    if isinstance(a, float) or isinstance(b, float):
        a, b = _as_float(a), _as_float(b)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        return Fraction(a // b) if isinstance(a, Fraction) else float(a // b)
    return a % b


class _Evaluator:
    """Walks a parsed expression; `steps` (if given) collects one line per operation."""

    def __init__(self, source: str, steps: list[str] | None):
        self.source = source
        # ast offsets count UTF-8 bytes; slice bytes unless the text is plain ASCII.
        self.raw = source if source.isascii() else source.encode()
        self.steps = steps
        self.nodes = 0

    def _step(self, text: str, value: Number) -> None:
        if self.steps is not None:
            self.steps.append(f"{text} = {format_number(value)}")

    def eval(self, node: ast.AST) -> Number:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"expression has more than {MAX_NODES} parts")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ValueError(f"unsupported literal {node.value!r}")
            # Read the literal's own text so that 0.1 is exactly 1/10, not the float nearest it.
            text = self.raw[node.col_offset:node.end_col_offset]
            text = text.decode() if isinstance(text, bytes) else text
            radix = text[:2].lower() in ("0x", "0o", "0b")
            mantissa, _, exponent = ("", "", "") if radix else text.lower().partition("e")
            # Fraction("1e999999999") would build the whole power: bound the exponent first.
            if len(mantissa) > MAX_DIGITS + 20 or (exponent and abs(int(exponent)) > MAX_DIGITS):
                raise ValueError(f"number too large: more than {MAX_DIGITS} digits")
            try:
                value = Fraction(text.replace("_", ""))
            except (ValueError, ZeroDivisionError):  # Hex, octal or binary literals.
                value = Fraction(node.value)
            return _check_size(value)
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ValueError(f"unknown name {node.id!r}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.eval(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.BitXor):
                raise ValueError("'^' is not a power here: write ** (2**8)")
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise ValueError(f"unsupported operator {type(node.op).__name__}")
            a, b = self.eval(node.left), self.eval(node.right)
            out = _check_size(_binop(op, a, b))
            if self.steps is not None:
                self._step(f"{format_number(a)} {op} {format_number(b)}", out)
            return out
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
                name = getattr(node.func, "id", ast.unparse(node.func))
                raise ValueError(f"unknown function {name!r}; known: {', '.join(_FUNCTIONS)}")
            if node.keywords:
                raise ValueError("keyword arguments are not supported")
            fn, lo, hi = _FUNCTIONS[node.func.id]
            if not lo <= len(node.args) <= hi:
                raise ValueError(f"{node.func.id} takes {lo}..{hi} arguments, got {len(node.args)}")
            args = [self.eval(a) for a in node.args]
            out = _check_size(fn(*args))
            if self.steps is not None:
                self._step(f"{node.func.id}({', '.join(format_number(a) for a in args)})", out)
            return out
        raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _normalise(expression: str) -> str:
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    # Newlines become spaces so that every literal sits on line 1 (its offsets index the text).
    return expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace("\n", " ").strip()


# CPython 3.11 (3.11.7 here and in CI; gh-106905) keeps one AST-construction depth counter per interpreter:
# two threads parsing at once (grain's reader threads building batches while the main thread
# builds more) can fail with "SystemError: AST constructor recursion depth mismatch". Parses are
# microseconds long, so one lock costs nothing.
_PARSE_LOCK = threading.RLock()


def _parse(expression: str) -> ast.Expression:
    if not expression:
        raise ValueError("expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        with _PARSE_LOCK:
            tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse expression: {err.msg}") from None
    return tree


def evaluate(expression: str, steps: list[str] | None = None) -> Number:
    """Evaluates an expression to an exact `Fraction` or, past irrational functions, a float.

    Args:
      expression: arithmetic in Python syntax, e.g. ``"(3 + 4.5) * sqrt(16) / comb(5, 2)"``.
      steps: if given, one line per operation (``"3 + 4.5 = 7.5"``) is appended, in order.

    Raises:
      ValueError: unsupported syntax or names, division by zero, or a size limit exceeded.
    """
    source = _normalise(expression)
    tree = _parse(source)
    try:
        return _Evaluator(source, steps).eval(tree)
    except (OverflowError, ZeroDivisionError) as err:
        raise ValueError(str(err) or "arithmetic error") from None
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def format_number(x: Number) -> str:
    """Formats a result: integers in full, exact decimals exactly, else 12 significant digits."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        d = x.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1:  # A terminating decimal: print it exactly.
            with decimal.localcontext() as ctx:
                ctx.prec = 2 * MAX_DIGITS + 10
                text = format(decimal.Decimal(x.numerator) / decimal.Decimal(x.denominator), "f")
            if len(text) <= 400:
                return text
        x = _as_float(x) if _digits(x.numerator) < 300 and _digits(x.denominator) < 300 else x
        if isinstance(x, Fraction):
            with decimal.localcontext() as ctx:
                ctx.prec = SIGNIFICANT_DIGITS
                return _trim(format(decimal.Decimal(x.numerator) / x.denominator, "g"))
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    text = format(x, f".{SIGNIFICANT_DIGITS}g")
    return _trim(text)


def _trim(text: str) -> str:
    mantissa, _, exponent = text.partition("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    if exponent:
        return f"{mantissa}e{int(exponent):+d}"
    return mantissa


def calculate(expression: str) -> str:
    """The calculator tool: evaluates `expression` and returns the formatted result.

    Args:
      expression: arithmetic in Python syntax with + - * / // % ** and parentheses, decimals,
        the functions sqrt sin cos tan (radians) log (base 10, or ``log(x, base)``) ln log10 log2
        exp abs round min max factorial comb perm, and the constants pi, e, tau.

    Returns:
      The result as text, e.g. ``calculate("0.1 + 0.2") == "0.3"``.

    Raises:
      ValueError: a message naming the problem (unknown name, division by zero, too large...).
    """
    return format_number(evaluate(expression))


def trace(expression: str) -> tuple[str, list[str]]:
    """Evaluates `expression` and returns ``(result, steps)``, one step line per operation."""
    steps: list[str] = []
    return format_number(evaluate(expression, steps)), steps
