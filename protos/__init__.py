"""Kestrel's protocol definitions and their generated Python stubs (see ``protos/generate.py``)."""
