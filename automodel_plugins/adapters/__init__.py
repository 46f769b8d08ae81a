"""State-dict adapters: pure mappings between a model's tensor names and one checkpoint's keys.

* ``base``: the contract, :class:`StateDictAdapter` (``from_hf`` / ``to_hf``), :class:`TensorSource` and the
  :class:`Piece` objects a tensor assembled from several checkpoint tensors lists;
* ``pieces``: the box geometry of pieces (:class:`~automodel_plugins.adapters.pieces.PieceGeometry`,
  :func:`~automodel_plugins.adapters.pieces.stacked_boxes`);
* ``fp8``: :class:`Fp8StateDictAdapter`, prefix renames plus FP8 scales, and :func:`fp8_adapter_for`, the
  adapter a config's ``quantization_config`` asks for (also the host's default when a plugin names none).
* ``experts``: fused MoE experts from per-expert checkpoint tensors (key patterns,
  :class:`~automodel_plugins.adapters.experts.ExpertShapes`, the pieces), shared by the MoE plugins.
"""

from __future__ import annotations

from automodel_plugins.adapters.base import Box, Piece, StateDictAdapter, TensorSource
from automodel_plugins.adapters.fp8 import Fp8StateDictAdapter, PrefixRename, PrefixRenames, fp8_adapter_for
from automodel_plugins.adapters.pieces import PieceGeometry, stacked_boxes

__all__ = [
    "Box",
    "Fp8StateDictAdapter",
    "Piece",
    "PieceGeometry",
    "PrefixRename",
    "PrefixRenames",
    "StateDictAdapter",
    "TensorSource",
    "fp8_adapter_for",
    "stacked_boxes",
]
