"""Tools the server (and the synthetic data generator) can run for the model."""

from serve.tools.calculator import calculate, evaluate, format_number, trace

__all__ = ["calculate", "evaluate", "format_number", "trace"]
