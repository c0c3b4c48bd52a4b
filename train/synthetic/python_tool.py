"""Runs the generator's own `python` tool code in-process, so recorded outputs are the real ones.

The code is trusted (the generator writes it), so this is a restricted namespace, not a sandbox:
no file or OS access through builtins, imports limited to math, fractions and itertools. Output is
captured by a private ``print`` rather than by swapping ``sys.stdout``, which keeps it thread-safe
for data-loader threads.
"""

import builtins
import fractions
import functools
import itertools
import math
from typing import Any

_ALLOWED_MODULES = {"math": math, "fractions": fractions, "itertools": itertools}

_SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "abs all any bool dict divmod enumerate filter float int len list map max min pow range "
        "reversed round set sorted str sum tuple zip ValueError ZeroDivisionError"
    ).split()
}


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name not in _ALLOWED_MODULES:
        raise ImportError(f"module {name!r} is not available; allowed: {', '.join(_ALLOWED_MODULES)}")
    return _ALLOWED_MODULES[name]


@functools.lru_cache(maxsize=4096)
def _compile(code: str):
    return compile(code, "<python tool>", "exec")


def run_python(code: str) -> str:
    """Executes `code` and returns what it printed, trailing whitespace removed.

    Args:
      code: Python source that prints its result.

    Raises:
      ValueError: the code raised; the message names the exception.
    """
    out: list[str] = []

    def _print(*args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        out.append(sep.join(str(a) for a in args) + end)

    namespace = {"__builtins__": {**_SAFE_BUILTINS, "print": _print, "__import__": _import}}
    try:
        exec(_compile(code), namespace)  # noqa: S102 - trusted generator code, restricted builtins
    except Exception as err:  # noqa: BLE001 - any failure of the program is the tool's output
        raise ValueError(f"python tool code failed: {type(err).__name__}: {err}") from None
    return "".join(out).rstrip()
