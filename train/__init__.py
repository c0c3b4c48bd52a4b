"""Training: run config, data sources, loss, optimizer, checkpointing, metrics and the loop.

The data pipeline and synthetic generator live in ``train/synthetic/`` and their own modules.
"""
