"""Attention kernels behind one dispatch per op; model code calls only these entry points.

``attention`` (block-sparse flash attention over a described mask) and ``paged_attention``
(decode / verify against a paged KV cache) each dispatch between Pallas kernels and plain-jnp
references; ``sharded_attention`` / ``sharded_paged_attention`` run them under a mesh.
"""

from model.kernels.attention import (attention, attention_reference, mask_from_description,
                                     resolve_impl)
from model.kernels.flash import BlockPlan, flash_attention, plan_blocks
from model.kernels.mask import (EMPTY, FULL, PARTIAL, BlockLists, MaskDescription, MaskKind,
                                block_lists, classify_blocks, visible)
from model.kernels.paged import paged_attention, paged_attention_reference
from model.kernels.sharded import sharded_attention, sharded_paged_attention

__all__ = [
    "EMPTY", "FULL", "PARTIAL", "BlockLists", "BlockPlan", "MaskDescription", "MaskKind",
    "attention", "attention_reference", "block_lists", "classify_blocks", "flash_attention",
    "mask_from_description", "paged_attention", "paged_attention_reference", "plan_blocks",
    "resolve_impl", "sharded_attention", "sharded_paged_attention", "visible",
]
