"""Attention kernels behind one dispatch per op; model code calls only these entry points."""

from model.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
