"""The one error type users see: a message that names the problem, printed without a traceback."""


class KestrelError(Exception):
    """Bad input or an unusable file. The CLI prints ``error: <message>`` and exits non-zero."""
