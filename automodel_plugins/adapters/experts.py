"""Fused MoE experts read from per-expert checkpoint tensors: the part every plugin of a transformers-5 MoE
model shares (Qwen3-VL-MoE, Mistral 4).

At runtime a MoE layer holds ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first, then up) and
``mlp.experts.down_proj [E, H, I]``; checkpoints saved per expert hold ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
Which forms a plugin accepts, and how it tells them apart, stays the plugin's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from automodel_plugins.adapters.base import Box, StateDictAdapter
from automodel_plugins.adapters.pieces import stacked_boxes

if TYPE_CHECKING:
    from automodel_plugins.adapters.fp8 import Fp8StateDictAdapter

__all__ = [
    "EXPERTS",
    "FUSED_KEY",
    "PER_EXPERT_KEY",
    "PROJECTIONS",
    "ExpertShapes",
    "FusedExpertsAdapter",
    "per_expert_pieces",
]

EXPERTS = ".mlp.experts."
PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Fused runtime parameter -> the per-expert projections stacked into it, in order along its dim 1."""
PER_EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
FUSED_KEY = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")


@dataclass(frozen=True)
class ExpertShapes:
    """The runtime shapes of one layer's expert parameters."""

    experts: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, config: Any, experts_field: str) -> ExpertShapes:
        """From the text config; ``experts_field`` names its expert count (``num_experts``, ``n_routed_experts``)."""
        text = config.get_text_config()
        return cls(getattr(text, experts_field), text.hidden_size, text.moe_intermediate_size)

    def runtime(self, parameter: str) -> tuple[int, int, int]:
        e, h, i = self.experts, self.hidden, self.intermediate
        return (e, 2 * i, h) if parameter == "gate_up_proj" else (e, h, i)

    @property
    def whole_matrix_block(self) -> tuple[int, int]:
        """A block size one block of which covers every expert matrix of both fused tensors: the block grid
        of one scale per expert is then ``[E, 1, 1]``."""
        side = max(2 * self.intermediate, self.hidden)
        return side, side


def per_expert_pieces(layer_key: str, parameter: str, shapes: ExpertShapes) -> Iterator[tuple[str, Box]]:
    """``(checkpoint key, box)`` of every expert's projections stacked into the fused ``parameter`` of the layer
    whose checkpoint key is ``layer_key``: expert ``e``'s ``j``-th projection fills the ``j``-th block of row
    ``e``."""
    projections = PROJECTIONS[parameter]
    boxes = _stacked_boxes(shapes.runtime(parameter), len(projections))
    for expert, row in enumerate(boxes):
        for projection, box in zip(projections, row, strict=True):
            yield f"{layer_key}{EXPERTS}{expert}.{projection}.weight", box


@functools.lru_cache(maxsize=64)
def _stacked_boxes(shape: tuple[int, int, int], parts: int) -> tuple[tuple[Box, ...], ...]:
    """:func:`stacked_boxes`, made once per shape: every MoE layer's experts have the same boxes (and so share
    one object per box)."""
    return tuple(map(tuple, stacked_boxes(shape, parts)))


class FusedExpertsAdapter(StateDictAdapter):
    """``inner`` (the layout's renames, FP8 scales) for every tensor; a subclass's ``from_hf`` reads the
    experts' fused parameters in the checkpoint's ``form`` (the plugin's own name for it, ``None``: no experts
    found)."""

    def __init__(self, inner: Fp8StateDictAdapter, form: str | None, shapes: ExpertShapes) -> None:
        self.inner = inner
        self.form = form
        self.shapes = shapes

    def to_hf(self, name: str) -> str:
        return self.inner.to_hf(name)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "adapter": type(self).__name__, "experts": self.form}
