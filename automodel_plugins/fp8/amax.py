"""The largest magnitude of a weight, per tensor or per block, from whatever part of it a process holds, and
its combination over ranks.

A scale needs the global amax: a per-tensor scale the max over the whole tensor (one all-reduce of a scalar),
a block grid the max over each block, whose rows may be split between ranks (an all-reduce MAX of the grid,
which is 1/16384 of its 128x128-block weight). A rank computes its part over the values it holds, at their
origin in the full weight; blocks it does not touch stay 0, which MAX ignores. Max is exact and order-free, so
the combined amax, and every scale made from it, is the same bits on every rank and in a single process.

A non-finite value makes the amax ``inf`` (NaN would not survive a MAX reduction the same way on every
backend), which the caller refuses, naming the tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["SERIAL_ELEMENTS", "all_reduce_max", "block_amax", "row_pieces", "tensor_amax"]

SERIAL_ELEMENTS = 1 << 14
"""Elements per torch call in the CPU loops here and in ``encode``: below torch's parallel grain (32768), so each
call runs on the calling thread. On a busy machine torch's intra-op thread pool made the same work 10-20x
slower than running it serially (and a sharded save runs one process per rank anyway)."""

# IEEE halves: |x| is the bit pattern without its sign bit, ordered like the magnitudes; above the inf
# pattern lie the NaNs. Read 64K elements at a time: fast (numpy, in cache) and bounded.
_HALF_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_CHUNK = 1 << 16


def tensor_amax(values: torch.Tensor) -> torch.Tensor:
    """``max |values|`` as a 0-d fp32 tensor (0 when empty, ``inf`` when any value is NaN or inf)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=values.device)
    if values.dtype in _HALF_INF_BITS and values.device.type == "cpu":
        return _half_amax(values)
    amax = values.detach().abs().amax().float()
    return amax if bool(torch.isfinite(amax)) else torch.full((), math.inf, device=values.device)


def _half_amax(values: torch.Tensor) -> torch.Tensor:
    bits = values.detach().contiguous().view(torch.int16).reshape(-1).numpy().view(np.uint16)
    scratch = np.empty(min(_CHUNK, bits.size), dtype=np.uint16)
    largest = 0
    for start in range(0, bits.size, _CHUNK):
        part = bits[start : start + _CHUNK]
        masked = scratch[: part.size]
        np.bitwise_and(part, 0x7FFF, out=masked)
        largest = max(largest, int(masked.max()))
    if largest >= _HALF_INF_BITS[values.dtype]:
        return torch.full((), math.inf)
    return torch.tensor([largest], dtype=torch.int16).view(values.dtype).float().reshape(())


def block_amax(
    values: torch.Tensor,
    block_size: tuple[int, int],
    grid_shape: tuple[int, int],
    *,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """The fp32 ``grid_shape`` grid of ``max |v|`` per ``block_size`` block, over the 2-D ``values`` that sit at
    ``origin`` in the full weight (any alignment; partial edge blocks included). Blocks the values do not touch
    are 0; blocks holding a NaN or inf are ``inf``."""
    rows, cols = values.shape
    block_rows, block_cols = block_size
    row0, col0 = origin
    grid = torch.zeros(grid_shape, dtype=torch.float32, device=values.device)
    if rows == 0 or cols == 0:
        return grid
    if values.dtype in _HALF_INF_BITS and values.device.type == "cpu":
        return _half_block_amax(values, block_size, grid, origin)
    first_col_block = col0 // block_cols
    row = 0
    while row < rows:
        block_row = (row0 + row) // block_rows
        end = min(rows, (block_row + 1) * block_rows - row0)
        parts = [_column_block_amax(piece.abs(), col0, block_cols) for piece in row_pieces(values[row:end])]
        per_block = torch.stack(parts).amax(0) if len(parts) > 1 else parts[0]
        grid[block_row, first_col_block : first_col_block + per_block.numel()] = per_block.float()
        row = end
    return torch.where(torch.isfinite(grid), grid, torch.full_like(grid, math.inf))


def _half_block_amax(
    values: torch.Tensor, block_size: tuple[int, int], grid: torch.Tensor, origin: tuple[int, int]
) -> torch.Tensor:
    """:func:`block_amax` of BF16 / FP16 values on CPU, on their magnitude bits (numpy, no float temporaries)."""
    block_rows, block_cols = block_size
    row0, col0 = origin
    bits = values.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
    rows, cols = bits.shape
    head = min(cols, (-col0) % block_cols)
    whole = (cols - head) // block_cols
    first_col_block = col0 // block_cols
    out = np.zeros(grid.shape, dtype=np.uint16)
    row = 0
    while row < rows:
        block_row = (row0 + row) // block_rows
        end = min(rows, (block_row + 1) * block_rows - row0)
        magnitudes = np.bitwise_and(bits[row:end], 0x7FFF)
        parts = []
        if head:
            parts.append(magnitudes[:, :head].max(keepdims=True).reshape(1))
        if whole:
            middle = magnitudes[:, head : head + whole * block_cols]
            parts.append(middle.reshape(end - row, whole, block_cols).max(axis=(0, 2)))
        if head + whole * block_cols < cols:
            parts.append(magnitudes[:, head + whole * block_cols :].max(keepdims=True).reshape(1))
        per_block = np.concatenate(parts)
        out[block_row, first_col_block : first_col_block + per_block.size] = per_block
        row = end
    finite = torch.from_numpy(out.astype(np.int16)).view(values.dtype).float()
    return torch.where(torch.from_numpy(out < _HALF_INF_BITS[values.dtype]), finite, math.inf)


def row_pieces(values: torch.Tensor) -> list[torch.Tensor]:
    """``values`` (2-D) split into runs of whole rows of about :data:`SERIAL_ELEMENTS` each."""
    if values.device.type != "cpu":
        return [values]
    rows = max(1, SERIAL_ELEMENTS // max(1, values.shape[1]))
    return list(values.split(rows))


def _column_block_amax(magnitudes: torch.Tensor, col0: int, block_cols: int) -> torch.Tensor:
    """Max over rows and over each column block of ``magnitudes`` (columns starting at ``col0``): the head up
    to the first block boundary, whole blocks as one view, then the tail."""
    cols = magnitudes.shape[1]
    head = min(cols, (-col0) % block_cols)
    whole = (cols - head) // block_cols
    parts = []
    if head:
        parts.append(magnitudes[:, :head].amax().reshape(1))
    if whole:
        middle = magnitudes[:, head : head + whole * block_cols]
        parts.append(middle.reshape(magnitudes.shape[0], whole, block_cols).amax(dim=(0, 2)))
    if head + whole * block_cols < cols:
        parts.append(magnitudes[:, head + whole * block_cols :].amax().reshape(1))
    return torch.cat(parts)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced in place by its elementwise MAX over every rank of the default process group (a
    no-op outside a distributed run). Every rank must call it, in the same order, with the same shape."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
