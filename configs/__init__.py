"""Run configs: each ``configs/NAME.py`` has ``config() -> RunConfig`` and a ``NAME_tiny.py`` twin."""
