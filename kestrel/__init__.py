"""Kestrel: a compact reasoning model and its whole stack in JAX."""

__version__ = "0.1.0"
