"""Fused training ops that need only torch (kept import-light: no transformers here).

* ``linear_cross_entropy``: the LM head and the cross-entropy fused, chunked so full logits never exist.
"""

from __future__ import annotations

from automodel_plugins.ops.linear_cross_entropy import (
    ChunkShape,
    choose_chunk_size,
    default_memory_budget,
    grad_chunk_rows,
    linear_cross_entropy,
    low_precision_chunk_size,
)

__all__ = [
    "ChunkShape",
    "choose_chunk_size",
    "default_memory_budget",
    "grad_chunk_rows",
    "linear_cross_entropy",
    "low_precision_chunk_size",
]
