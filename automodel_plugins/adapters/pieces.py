"""Box geometry of tensors assembled from pieces: where a piece lies in its model tensor, which part of it a
rank's region overlaps, and how that part is addressed in the stored tensor.

A :class:`~automodel_plugins.adapters.base.Piece` fills a box of the model tensor; the stored tensor is that
box with leading size-1 dims left out (one expert of a stacked ``[E, 2I, H]`` tensor is stored ``[I, H]``) and
maybe its last two dims swapped (a fused tensor stored transposed). :class:`PieceGeometry` maps between the two
coordinate systems, so a loader reads only the stored region a rank needs and writes it into its place, and a
saver runs the same map backwards. :func:`stacked_boxes` lays out the boxes of the common case (pieces stacked
along dim 0 and concatenated along another dim) for an adapter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from automodel_plugins.adapters.base import Box, Piece

__all__ = [
    "PieceGeometry",
    "as_slices",
    "boxes_tile",
    "intersect",
    "relative_slices",
    "stacked_boxes",
    "volume",
    "whole_box",
]


def whole_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(size)) for size in shape)


def volume(box: Box) -> int:
    return math.prod(max(0, stop - start) for start, stop in box)


def intersect(first: Box, second: Box) -> Box | None:
    """The overlap of two boxes of the same tensor, or ``None`` when they share no element."""
    overlap = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(first, second, strict=True))
    return overlap if all(start < stop for start, stop in overlap) else None


def as_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def relative_slices(inner: Box, outer: Box) -> tuple[slice, ...]:
    """``inner`` (inside ``outer``) as slices of a tensor holding ``outer``."""
    return tuple(slice(a - b, c - b) for (a, c), (b, _) in zip(inner, outer, strict=True))


def boxes_tile(shape: Sequence[int], boxes: Sequence[Box]) -> bool:
    """Whether ``boxes`` cover a ``shape`` tensor exactly once (no gap, no overlap).

    Pairwise for a few boxes; for many, they must form a grid (each dim cut into intervals that tile it, every
    combination present once), which stacked pieces and chunked placements give.
    """
    volumes = list(map(volume, boxes))
    if sum(volumes) != math.prod(shape):
        return False
    boxes = [box for box, size in zip(boxes, volumes, strict=True) if size]
    if any(start < 0 or stop > size for box in boxes for (start, stop), size in zip(box, shape, strict=True)):
        return False
    if len(boxes) <= 64:
        return not any(intersect(first, second) for i, first in enumerate(boxes) for second in boxes[i + 1 :])
    cuts = [sorted({box[dim] for box in boxes}) for dim in range(len(boxes[0]))]
    tiles = all(all(a[1] == b[0] for a, b in itertools.pairwise(intervals)) for intervals in cuts)
    return tiles and len(set(boxes)) == len(boxes) == math.prod(len(intervals) for intervals in cuts)


def stacked_boxes(shape: Sequence[int], parts: int, *, dim: int = 1) -> list[list[Box]]:
    """For each index along dim 0 of a ``shape`` tensor, ``parts`` equal boxes splitting ``dim``: the boxes of
    per-expert pieces (``[E, 2I, H]`` from a gate and an up ``[I, H]`` per expert: ``parts=2``, ``dim=1``)."""
    shape = tuple(int(size) for size in shape)
    if not 0 < dim < len(shape):
        raise ValueError(f"pieces stack along dim 0 and split another dim of shape {shape}, not dim {dim}")
    if shape[dim] % parts:
        raise ValueError(f"dim {dim} of shape {shape} does not split into {parts} equal parts")
    step = shape[dim] // parts
    whole = whole_box(shape)
    out = []
    for index in range(shape[0]):
        row = []
        for part in range(parts):
            box = list(whole)
            box[0] = (index, index + 1)
            box[dim] = (part * step, (part + 1) * step)
            row.append(tuple(box))
        out.append(row)
    return out


@dataclass(frozen=True)
class PieceGeometry:
    """A piece's ``box`` in its model tensor, and how its stored tensor (``stored_ndim`` dims, maybe
    ``transposed``) addresses it."""

    box: Box
    stored_ndim: int
    transposed: bool = False
    rope_heads: int | None = None

    @classmethod
    def of(cls, piece: Piece, shape: Sequence[int], stored_ndim: int) -> PieceGeometry:
        return cls(piece.box_in(shape), stored_ndim, piece.transposed, piece.rope_heads)

    @property
    def squeezed(self) -> int:
        """Leading dims of the box the stored tensor leaves out."""
        return len(self.box) - self.stored_ndim

    @property
    def box_shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.box)

    @property
    def stored_shape(self) -> tuple[int, ...] | None:
        """The stored tensor's shape, or ``None`` when no stored tensor of ``stored_ndim`` dims can hold the
        box (a left-out dim of size > 1, a transposed tensor of fewer than 2 dims)."""
        shape = self.box_shape
        if self.squeezed < 0 or any(size != 1 for size in shape[: self.squeezed]):
            return None
        stored = list(shape[self.squeezed :])
        if self.transposed:
            if len(stored) < 2:
                return None
            stored[-2], stored[-1] = stored[-1], stored[-2]
        return tuple(stored)

    @property
    def keeps_rows(self) -> bool:
        """Whether the stored tensor's dim 0 is the model tensor's dim 0 (a run of model rows is a run of
        stored rows)."""
        return (
            self.squeezed == 0 and not (self.transposed and self.stored_ndim == 2) and self.rope_heads is None
        )

    def stored_region(self, overlap: Box) -> Box:
        """The part ``overlap`` (a box of the model tensor inside :attr:`box`) in stored coordinates (for rows
        in rotary order: every row of the box, since a model row's stored row lies elsewhere in its head)."""
        local = [(a - b, c - b) for (a, c), (b, _) in zip(overlap, self.box, strict=True)][self.squeezed :]
        if self.transposed:
            local[-2], local[-1] = local[-1], local[-2]
        if self.rope_heads is not None:
            local[0] = (0, self.box[self.squeezed][1] - self.box[self.squeezed][0])
        return tuple(local)

    def whole_heads(self, overlap: Box) -> tuple[int, int] | None:
        """For rows in rotary order: the rows ``[start, stop)`` of the stored tensor that ``overlap`` (a box of
        the model tensor inside :attr:`box`) covers when it covers whole heads only (a head's rows are
        permuted among themselves, so whole heads are the same rows stored and in the model); else ``None``."""
        if self.rope_heads is None:
            return None
        (start, stop), (first, last) = overlap[self.squeezed], self.box[self.squeezed]
        per_head = (last - first) // self.rope_heads
        start, stop = start - first, stop - first
        return (start, stop) if start % per_head == 0 and stop % per_head == 0 else None

    def heads_to_stored(self, model_view: torch.Tensor) -> torch.Tensor:
        """:meth:`to_stored` of the model values of whole heads (an overlap :meth:`whole_heads` accepts)."""
        value = model_view.reshape(model_view.shape[self.squeezed :]) if self.squeezed else model_view
        per_head = (self.box[self.squeezed][1] - self.box[self.squeezed][0]) // self.rope_heads
        value = _rope_rows(value, value.shape[0] // per_head, to_half_split=False)
        return value.transpose(-2, -1) if self.transposed else value

    def to_model(self, stored: torch.Tensor, overlap: Box) -> torch.Tensor:
        """Values read from :meth:`stored_region` as a view shaped like ``overlap``, in the model's orientation."""
        value = stored.transpose(-2, -1) if self.transposed else stored
        if self.rope_heads is not None:
            (start, stop), (first, _) = overlap[self.squeezed], self.box[self.squeezed]
            value = _rope_rows(value, self.rope_heads, to_half_split=True)[start - first : stop - first]
        return value.reshape(tuple(stop - start for start, stop in overlap))

    def to_stored(self, model_view: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_model`: model values of an overlap as the stored tensor orders them (rows
        in rotary order need every row of the box: a rank holding part of a head cannot reorder it alone)."""
        value = model_view.reshape(model_view.shape[self.squeezed :]) if self.squeezed else model_view
        if self.rope_heads is not None:
            rows = self.box[self.squeezed][1] - self.box[self.squeezed][0]
            if value.shape[0] != rows:
                raise ValueError(
                    f"rows in rotary order are written whole: {value.shape[0]} of {rows} rows are held here"
                )
            value = _rope_rows(value, self.rope_heads, to_half_split=False)
        return value.transpose(-2, -1) if self.transposed else value


def _rope_rows(matrix: torch.Tensor, heads: int, *, to_half_split: bool) -> torch.Tensor:
    """Rows of each head from Mistral's interleaved rotary order (pairs ``2i, 2i+1``) to transformers'
    half-split order (``i, i + d/2``), or back: transformers' ``permute_for_rope`` and its inverse."""
    rows, rest = matrix.shape[0], matrix.shape[1:]
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    half = rows // heads // 2
    if to_half_split:
        return matrix.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)
    return matrix.reshape(heads, 2, half, *rest).transpose(1, 2).reshape(rows, *rest)
