"""FP8 weight dequantization (per-tensor and block scales), whole or for one rank's region of a weight.

The product is always taken in fp32 and cast once to the target dtype: that is what transformers' own
dequant does, so results are bit-identical to it (a bf16 x bf16 product would not be). Elementwise math
on fp8 tensors is not implemented on CPU, so weights are upcast before any arithmetic.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np
import torch

from automodel_plugins.errors import ScaleError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import check_block_size, check_scale_shape, decode_scale

__all__ = ["dequantize", "table_lookup_applies"]

# Rows per dequant chunk are chosen so the fp32 temporaries stay near this many elements (4 MiB).
_CHUNK_ELEMENTS = 1 << 20


def _region_origin(region: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[int, int]:
    """(first row, first col) of ``region`` in the full weight, checking it is a plain step-1 slice."""
    if region is None:
        return 0, 0
    if len(region) > 2:
        raise ValueError(f"region {region!r} has more than two slices for a 2-D weight")
    origin = []
    for dim, part in enumerate((*region, slice(None), slice(None))[:2]):
        start = 0 if part.start is None else part.start
        if (
            part.step not in (None, 1)
            or start < 0
            or (part.stop is not None and part.stop - start < shape[dim])
        ):
            raise ValueError(
                f"region slice {part} (dim {dim}) must have step 1, a non-negative start, and cover the "
                f"{shape[dim]} given rows/cols"
            )
        origin.append(start)
    return origin[0], origin[1]


def _row_chunk(rows: int, cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, cols)) if rows else 1


# --- CPU fast path: table lookup ---------------------------------------------------------------------------
# torch's CPU fp8 -> fp32 cast runs element by element (~100M elements/s), which made it most of a load's time.
# An fp8 weight has only 256 byte values, so a pair of bytes (one native uint16) has 65536: a table of the 65536
# decoded pairs, each value computed with the very formula of the slow path (fp32 product, one rounding to the
# target dtype), turns the dequant into one gather - bit-identical by construction, NaN payloads included.
# The gather is numpy's ``take`` in cache-sized chunks: serial, so it never waits on torch's intra-op thread
# pool (which, on a busy 2-core machine, cost more than the work itself), ~2.5 ns per pair.
_LUT_MIN_ELEMENTS = 1 << 12  # below this the table (256 values + a 65536-entry expansion) is not worth it
_LUT_CHUNK_PAIRS = 1 << 16  # 512 KiB of intp indices per take: stays in cache
_BITS = {2: (torch.int16, np.int16, np.int32), 4: (torch.int32, np.int32, np.int64)}  # itemsize -> views


def table_lookup_applies(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize` takes the CPU table-lookup path for ``weight`` into ``dtype``."""
    return (
        weight.device.type == "cpu"
        and is_fp8(weight.dtype)
        and dtype.itemsize in _BITS
        and weight.numel() >= _LUT_MIN_ELEMENTS
        and weight.numel() % 2 == 0
        and weight.is_contiguous()
    )


def _borrowed_bytes(weight: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat numpy array, valid while ``weight`` lives.

    Not ``Tensor.numpy()``: that marks the storage as never resizable again, and FSDP2 frees the unsharded
    parameter an FP8-resident layer dequantizes from by resizing its storage to 0 after the forward.
    """
    nbytes = weight.numel() * weight.element_size()
    pointer = ctypes.cast(weight.data_ptr(), ctypes.POINTER(ctypes.c_uint8))
    return np.ctypeslib.as_array(pointer, shape=(nbytes,))


def _pair_table(fp8_dtype: torch.dtype, scale: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """Entry ``u``: the two fp8 bytes whose native uint16 is ``u``, each decoded (``* scale`` in fp32) to
    ``dtype``, as one integer holding the two results in memory order."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    if scale is not None:
        values.mul_(scale)
    torch_bits, np_bits, np_pair = _BITS[dtype.itemsize]
    bits = values.to(dtype).view(torch_bits).numpy()
    table = np.empty((256, 256, 2), dtype=np_bits)  # [high-order byte, low-order byte, position in memory]
    first, second = (
        (bits[None, :], bits[:, None]) if sys.byteorder == "little" else (bits[:, None], bits[None, :])
    )
    table[:, :, 0] = first
    table[:, :, 1] = second
    return table.reshape(-1).view(np_pair)


def _lut_decode(weight: torch.Tensor, table: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (contiguous fp8, even numel) looked up in a :func:`_pair_table`, in cache-sized chunks."""
    pairs = _borrowed_bytes(weight).view(np.uint16)
    out = torch.empty(weight.shape, dtype=dtype)
    target = out.view(_BITS[dtype.itemsize][0]).reshape(-1).numpy().view(table.dtype)
    for start in range(0, pairs.size, _LUT_CHUNK_PAIRS):
        np.take(
            table,
            pairs[start : start + _LUT_CHUNK_PAIRS],
            out=target[start : start + _LUT_CHUNK_PAIRS],
            mode="clip",
        )  # uint16 indices into 65536 entries: always in range
    return out


@functools.lru_cache(maxsize=8)
def _float_table(fp8_dtype: torch.dtype) -> np.ndarray:
    return _pair_table(fp8_dtype, None, torch.float32)


def _to_float(weight: torch.Tensor) -> torch.Tensor:
    """``weight.float()`` (same bits, NaN payloads included), on CPU through a table when it pays."""
    if not table_lookup_applies(weight, torch.float32):
        return weight.float()
    return _lut_decode(weight, _float_table(weight.dtype), torch.float32)


def _lut_dequantize_blocks(
    weight: torch.Tensor,
    grid: torch.Tensor,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    origin: tuple[int, int],
) -> torch.Tensor:
    """Block scales through tables: per block row, one 256-entry table per column block (byte value times that
    block's scale, reference formula), stacked; each byte's index is ``its column block * 256 + byte``."""
    rows, cols = weight.shape
    bm, bn = block_size
    r0, c0 = origin
    torch_bits = _BITS[dtype.itemsize][0]
    values = torch.arange(256, dtype=torch.uint8).view(weight.dtype).float()
    col_block = np.arange(c0, c0 + cols) // bn
    first, last = int(col_block[0]), int(col_block[-1])
    offsets = ((col_block - first) * 256).astype(np.int32)
    source = _borrowed_bytes(weight).reshape(weight.shape)
    out = torch.empty(weight.shape, dtype=dtype)
    target = out.view(torch_bits).numpy()
    sub = max(1, _LUT_CHUNK_PAIRS // cols)  # rows per take: 256 KiB of int32 indices
    index = np.empty((min(sub, rows), cols), dtype=np.int32)
    r = 0
    while r < rows:
        block_row = (r0 + r) // bm
        end = min(rows, (block_row + 1) * bm - r0)
        scales = grid[block_row, first : last + 1].float().cpu()
        table = (values[None, :] * scales[:, None]).to(dtype).view(torch_bits).reshape(-1).numpy()
        for start in range(r, end, sub):
            stop = min(end, start + sub)
            chunk = index[: stop - start]
            np.add(source[start:stop], offsets, out=chunk, dtype=np.int32)
            np.take(table, chunk, out=target[start:stop], mode="clip")  # indices are in range by construction
        r = end
    return out


def _dequantize_per_tensor(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if table_lookup_applies(weight, dtype):
        return _lut_decode(weight, _pair_table(weight.dtype, scale, dtype), dtype)
    if weight.dim() < 2:
        return (weight.float() * scale).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    step = _row_chunk(weight.shape[0], weight[0].numel())
    for r in range(0, weight.shape[0], step):
        out[r : r + step] = weight[r : r + step].float().mul_(scale)
    return out


def _dequantize_blocks(
    weight: torch.Tensor,
    grid: torch.Tensor,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    origin: tuple[int, int],
) -> torch.Tensor:
    """Multiply each element by its block's scale, for a weight that may be an unaligned region."""
    rows, cols = weight.shape
    bm, bn = block_size
    r0, c0 = origin
    if rows and cols and ((r0 + rows - 1) // bm >= grid.shape[0] or (c0 + cols - 1) // bn >= grid.shape[1]):
        raise ScaleError(
            f"scale grid shape {tuple(grid.shape)} with block size {tuple(block_size)} does not cover "
            f"rows {r0}:{r0 + rows}, cols {c0}:{c0 + cols}"
        )
    if table_lookup_applies(weight, dtype) and rows and cols:
        return _lut_dequantize_blocks(weight, grid, dtype, block_size, origin)
    device = weight.device
    col_scale_index = torch.arange(c0, c0 + cols, device=device) // bn
    out = torch.empty(weight.shape, dtype=dtype, device=device)
    step = _row_chunk(rows, cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        row_scale_index = torch.arange(r0 + r, r0 + r + n, device=device) // bm
        expanded = grid.index_select(0, row_scale_index).index_select(1, col_scale_index)
        out[r : r + n] = _to_float(weight[r : r + n]).mul_(expanded)
    return out


def dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    block_size: tuple[int, int] | None = None,
    region: tuple[slice, slice] | None = None,
) -> torch.Tensor:
    """``(weight.float() * scale.float()).to(dtype)``, with block scales expanded over their blocks.

    ``weight`` is either the full fp8 weight or, with ``region``, the already-read ``full[region]``;
    ``scale`` is always the full scale (0-d or the whole grid), moved to the weight's device.
    Works in row chunks so the fp32 temporaries stay bounded whatever the weight size.
    """
    decoded = decode_scale(scale).to(weight.device)
    if block_size is None:
        if decoded.numel() != 1:
            raise ScaleError(f"per-tensor scale must hold one element, got shape {tuple(scale.shape)}")
        return _dequantize_per_tensor(weight, decoded.reshape(()), dtype)
    check_block_size(block_size, None, None)
    if weight.dim() != 2 or decoded.dim() != 2:
        raise ScaleError(
            f"block scales need a 2-D weight and grid, got weight {tuple(weight.shape)}, grid {tuple(scale.shape)}"
        )
    origin = _region_origin(region, tuple(weight.shape))
    if region is None:
        check_scale_shape(scale, tuple(weight.shape), block_size, None, None)
    return _dequantize_blocks(weight, decoded, dtype, tuple(block_size), origin)
