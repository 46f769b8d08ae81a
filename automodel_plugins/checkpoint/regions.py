"""Where a box of a row-major tensor lies in its bytes: the contiguous runs a reader preads and a writer pwrites.

A box is one step-1 slice per leading dim (the dims not given are whole). Its elements are a sequence of runs
of consecutive elements in the tensor's row-major order: everything after the last dim the box narrows is
contiguous, so a box of whole rows is one run and a column slice is one run per row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

__all__ = ["box_runs", "box_shape"]


def box_shape(shape: Sequence[int], bounds: Sequence[slice]) -> tuple[int, ...]:
    """The shape of the box ``bounds`` (explicit, non-negative, step-1 slices) of a ``shape`` tensor."""
    return tuple(b.stop - b.start for b in bounds) + tuple(shape[len(bounds) :])


def box_runs(shape: Sequence[int], bounds: Sequence[slice]) -> tuple[int, Iterator[int]]:
    """``(run_elements, offsets)``: the box is ``len(offsets)`` runs of ``run_elements`` consecutive elements,
    starting at these element offsets into the tensor, in the box's own row-major order."""
    shape = tuple(shape)
    narrowed = [d for d, b in enumerate(bounds) if (b.start, b.stop) != (0, shape[d])]
    if not narrowed:
        return math.prod(shape), iter([0])
    cut = narrowed[-1]
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run = (bounds[cut].stop - bounds[cut].start) * strides[cut]
    inner = bounds[cut].start * strides[cut]
    outer = [range(b.start, b.stop) for b in bounds[:cut]]
    offsets = (
        sum(i * strides[d] for d, i in enumerate(index)) + inner for index in itertools.product(*outer)
    )
    return run, offsets
