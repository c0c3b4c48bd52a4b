"""The local functions `make demo` registers with `kestrel chat --function` (the client runs them).

Their answers are made up, deterministic and shaped like the function results kestrel-nano was
trained on (``{"result": CODE}``).
"""

import zlib


def _code(prefix: str, *parts: str) -> str:
    return f"{prefix}-{zlib.crc32('/'.join(parts).encode()) % 90000 + 10000}"


def fetch_share_quote(symbol: str) -> dict:
    """Fetch the share quote."""
    return {"result": _code("SHA", symbol)}


def reserve_train_seat(city: str, date: str) -> dict:
    """Reserve the train seat."""
    return {"result": _code("TRA", city, date)}
