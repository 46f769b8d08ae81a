"""Block FP8 for stacked matrices: a ``[..., R, C]`` weight (a fused MoE ``experts.gate_up_proj [E, 2I, H]``) whose
scale grid is one 2-D grid per matrix, ``[..., ceil(R/bm), ceil(C/bn)]`` (transformers' ``FP8Experts`` layout,
``gate_up_proj_scale_inv``).

Each matrix is dequantized, measured and encoded exactly as a 2-D weight is (``decode``, ``amax``, ``encode``),
one leading index at a time, so the results are those of the 2-D path on every matrix. A region of a stacked
weight is a range of matrices (the leading dims) and one 2-D region of each.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from automodel_plugins.errors import ScaleError
from automodel_plugins.fp8.amax import block_amax
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.encode import encode
from automodel_plugins.fp8.scales import check_block_size, check_scale_header, grid_shape, validate_scale

__all__ = [
    "check_stacked_scale_header",
    "check_stacked_scale_shape",
    "is_stacked",
    "stacked_block_amax",
    "stacked_dequantize",
    "stacked_encode",
    "stacked_grid_shape",
    "validate_stacked_scale",
]


def is_stacked(weight_shape: tuple[int, ...], block_size: tuple[int, int] | None) -> bool:
    """Whether a weight of this shape has one block grid per matrix (more than 2 dims, block scales)."""
    return block_size is not None and len(weight_shape) > 2


def stacked_grid_shape(weight_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    """``weight_shape[:-2]`` followed by the grid of one matrix."""
    return tuple(weight_shape[:-2]) + grid_shape(tuple(weight_shape[-2:]), block_size)


def _leading(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(size) for size in shape))


def check_stacked_scale_shape(
    scale_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int],
    key: str | None,
    path: str | Path | None,
) -> None:
    """The scale of a stacked weight must be one grid per matrix."""
    check_block_size(block_size, key, path)
    expected = stacked_grid_shape(tuple(weight_shape), block_size)
    if tuple(scale_shape) != expected:
        raise ScaleError(
            f"scale grid shape {tuple(scale_shape)} does not fit stacked weight shape {tuple(weight_shape)} "
            f"with block size {tuple(block_size)}: expected {expected} (one grid per matrix)",
            path=path,
            key=key,
        )


def check_stacked_scale_header(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    *,
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int],
    key: str,
    path: str | Path | None = None,
) -> None:
    """:func:`~automodel_plugins.fp8.scales.check_scale_header` for a stacked weight: one grid per matrix,
    each of a scale dtype."""
    check_stacked_scale_shape(tuple(shape), tuple(weight_shape), block_size, key, path)
    check_scale_header(
        dtype,
        tuple(shape[-2:]),
        weight_shape=tuple(weight_shape[-2:]),
        block_size=block_size,
        key=key,
        path=path,
    )


def validate_stacked_scale(
    scale: torch.Tensor,
    *,
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int],
    key: str,
    path: str | Path | None = None,
) -> None:
    """The stacked grid shape, and every matrix's grid refused as a 2-D weight's would be."""
    check_stacked_scale_shape(tuple(scale.shape), tuple(weight_shape), block_size, key, path)
    for index in _leading(tuple(weight_shape[:-2])):
        validate_scale(
            scale[index], weight_shape=tuple(weight_shape[-2:]), block_size=block_size, key=key, path=path
        )


def _matrix_region(
    region: tuple[slice, ...] | None, ndim: int
) -> tuple[tuple[int, ...], tuple[slice, slice]]:
    """(first leading index, the 2-D region) of a region of a stacked weight (None: all of it)."""
    parts = tuple(region or ()) + (slice(None),) * (ndim - len(region or ()))
    starts = tuple(0 if part.start is None else part.start for part in parts[:-2])
    return starts, (parts[-2], parts[-1])


def stacked_dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    region: tuple[slice, ...] | None = None,
    key: str | None = None,
    path: str | Path | None = None,
) -> torch.Tensor:
    """:func:`~automodel_plugins.fp8.decode.dequantize` of each matrix of ``weight`` (the whole stacked weight,
    or with ``region`` the already-read ``full[region]``) with its own grid of the whole ``scale``; NaN or inf
    refused as there, naming ``key`` and ``path``."""
    starts, matrix_region = _matrix_region(region, weight.dim())
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for index in _leading(tuple(weight.shape[:-2])):
        grid = scale[tuple(start + i for start, i in zip(starts, index, strict=True))]
        out[index] = dequantize(
            weight[index],
            grid,
            dtype=dtype,
            block_size=block_size,
            region=None if region is None else matrix_region,
            key=key,
            path=path,
        )
    return out


def stacked_block_amax(
    values: torch.Tensor,
    block_size: tuple[int, int],
    grid: tuple[int, ...],
    *,
    origin: tuple[int, ...],
) -> torch.Tensor:
    """The stacked ``grid`` of block amaxes over ``values`` sitting at ``origin`` (one start per dim)."""
    out = torch.zeros(grid, dtype=torch.float32, device=values.device)
    lead = len(grid) - 2
    for index in _leading(tuple(values.shape[:lead])):
        target = tuple(o + i for o, i in zip(origin[:lead], index, strict=True))
        out[target] = block_amax(values[index], block_size, tuple(grid[lead:]), origin=tuple(origin[lead:]))
    return out


def stacked_encode(
    values: torch.Tensor,
    scale: torch.Tensor,
    *,
    fp8_dtype: torch.dtype,
    block_size: tuple[int, int],
    origin: tuple[int, ...],
) -> torch.Tensor:
    """Each matrix of ``values`` (at ``origin`` in the stacked weight) encoded with its own grid of ``scale``."""
    lead = scale.dim() - 2
    out = torch.empty(values.shape, dtype=fp8_dtype, device=values.device)
    for index in _leading(tuple(values.shape[:lead])):
        grid = scale[tuple(o + i for o, i in zip(origin[:lead], index, strict=True))]
        out[index] = encode(
            values[index], grid, fp8_dtype=fp8_dtype, block_size=block_size, origin=tuple(origin[lead:])
        )
    return out
