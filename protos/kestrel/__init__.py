"""The ``kestrel`` proto package."""
