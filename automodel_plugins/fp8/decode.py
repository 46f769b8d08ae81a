"""FP8 weight dequantization (per-tensor and block scales), whole or for one rank's region of a weight.

The product is always taken in fp32 and cast once to the target dtype: that is what transformers' own
dequant does, so results are bit-identical to it (a bf16 x bf16 product would not be). Elementwise math
on fp8 tensors is not implemented on CPU, so weights are upcast before any arithmetic.

No result holds NaN or inf: an FP8 NaN code, or a finite value whose product with its (finite) scale overflows
the target dtype, raises :class:`~automodel_plugins.errors.NonFiniteWeightError`. Which byte values go bad is
known from the largest scale before any weight is decoded (256 candidates), so on CPU the table lookup checks
each chunk of bytes it reads with two ``max`` reductions; the decoded values are scanned only when a byte that
may go bad is present.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from automodel_plugins.errors import NonFiniteWeightError, ScaleError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import check_block_size, check_scale_shape, decode_scale

__all__ = ["check_finite", "dequantize", "table_lookup_applies"]

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


def _lut_decode(
    weight: torch.Tensor, table: np.ndarray, dtype: torch.dtype, watch: _BadByteWatch | None = None
) -> torch.Tensor:
    """``weight`` (contiguous fp8, even numel) looked up in a :func:`_pair_table`, in cache-sized chunks;
    ``watch`` sees each chunk's bytes right after the lookup read them."""
    raw = _borrowed_bytes(weight)
    pairs = raw.view(np.uint16)
    out = torch.empty(weight.shape, dtype=dtype)
    target = out.view(_BITS[dtype.itemsize][0]).reshape(-1).numpy().view(table.dtype)
    for start in range(0, pairs.size, _LUT_CHUNK_PAIRS):
        np.take(
            table,
            pairs[start : start + _LUT_CHUNK_PAIRS],
            out=target[start : start + _LUT_CHUNK_PAIRS],
            mode="clip",
        )  # uint16 indices into 65536 entries: always in range
        if watch is not None:
            watch.see(raw[2 * start : 2 * (start + _LUT_CHUNK_PAIRS)])
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
    watch: _BadByteWatch,
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
            watch.see(source[start:stop])
        r = end
    return out


def _dequantize_per_tensor(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, watch: _BadByteWatch
) -> torch.Tensor:
    if table_lookup_applies(weight, dtype):
        return _lut_decode(weight, _pair_table(weight.dtype, scale, dtype), dtype, watch)
    watch.unseen()
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
    watch: _BadByteWatch,
) -> torch.Tensor:
    """Multiply each element by its block's scale, for a weight that may be an unaligned region."""
    rows, cols = weight.shape
    bm, bn = block_size
    r0, c0 = origin
    if table_lookup_applies(weight, dtype) and rows and cols:
        return _lut_dequantize_blocks(weight, grid, dtype, block_size, origin, watch)
    watch.unseen()
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
    key: str | None = None,
    path: str | Path | None = None,
) -> torch.Tensor:
    """``(weight.float() * scale.float()).to(dtype)``, with block scales expanded over their blocks.

    ``weight`` is either the full fp8 weight or, with ``region``, the already-read ``full[region]``;
    ``scale`` is always the full scale (0-d or the whole grid), moved to the weight's device.
    Works in row chunks so the fp32 temporaries stay bounded whatever the weight size. Raises
    :class:`~automodel_plugins.errors.NonFiniteWeightError` (naming ``key`` and ``path`` when given) rather
    than return NaN or inf, and :class:`~automodel_plugins.errors.ScaleError` for a scale that does not fit.
    """
    decoded = decode_scale(scale).to(weight.device)
    if block_size is None:
        if decoded.numel() != 1:
            raise ScaleError(
                f"per-tensor scale must hold one element, got shape {tuple(scale.shape)}", path=path, key=key
            )
        decoded = decoded.reshape(())
        watch = _BadByteWatch.for_scales(weight, decoded.reshape(1), dtype)
        out = _dequantize_per_tensor(weight, decoded, dtype, watch)
        if watch.needs_scan:
            _refuse_non_finite(weight, out, lambda position: decoded, dtype, key=key, path=path)
        return out
    check_block_size(block_size, key, path)
    if weight.dim() != 2 or decoded.dim() != 2:
        raise ScaleError(
            f"block scales need a 2-D weight and grid, got weight {tuple(weight.shape)}, grid {tuple(scale.shape)}",
            path=path,
            key=key,
        )
    origin = _region_origin(region, tuple(weight.shape))
    if region is None:
        check_scale_shape(tuple(scale.shape), tuple(weight.shape), block_size, key, path)
    grid = _covering_grid(decoded, tuple(weight.shape), tuple(block_size), origin, key=key, path=path)
    watch = _BadByteWatch.for_scales(weight, grid.reshape(-1), dtype)
    out = _dequantize_blocks(weight, decoded, dtype, tuple(block_size), origin, watch)
    if watch.needs_scan:
        bm, bn = block_size

        def scale_at(position: tuple[int, ...]) -> torch.Tensor:
            return decoded[(origin[0] + position[0]) // bm, (origin[1] + position[1]) // bn]

        _refuse_non_finite(weight, out, scale_at, dtype, key=key, path=path)
    return out


def check_finite(
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    block_size: tuple[int, int] | None = None,
    region: tuple[slice, slice] | None = None,
    key: str | None = None,
    path: str | Path | None = None,
) -> None:
    """Raise :class:`~automodel_plugins.errors.NonFiniteWeightError` when :func:`dequantize` of these FP8
    codes would hold NaN or inf in ``dtype``, for weights kept FP8 (their dequantization happens later, in
    every forward). Two max reductions over the bytes decide; the values are computed (to name the first bad
    one) only when some byte reaches what the worst scale makes bad.
    """
    if not weight.numel():
        return
    watch = _BadByteWatch.for_scales(weight, decode_scale(scale).reshape(-1), dtype)
    if not watch.needs_scan and watch.threshold != _NO_BAD_CODE:
        step = _row_chunk(weight.shape[0], weight[0].numel()) if weight.dim() else 1
        for start in range(0, max(1, weight.shape[0] if weight.dim() else 1), step):
            watch.see(_borrowed_bytes(weight[start : start + step].contiguous() if weight.dim() else weight))
            if watch.needs_scan:
                break
    if watch.needs_scan:
        dequantize(weight, scale, dtype=dtype, block_size=block_size, region=region, key=key, path=path)


def _covering_grid(
    grid: torch.Tensor,
    shape: tuple[int, int],
    block_size: tuple[int, int],
    origin: tuple[int, int],
    *,
    key: str | None,
    path: str | Path | None,
) -> torch.Tensor:
    """The cells of ``grid`` that scale the ``shape`` region at ``origin``; ScaleError when it does not cover it."""
    (rows, cols), (bm, bn), (r0, c0) = shape, block_size, origin
    if not (rows and cols):
        return grid[:0, :0]
    last_row, last_col = (r0 + rows - 1) // bm, (c0 + cols - 1) // bn
    if last_row >= grid.shape[0] or last_col >= grid.shape[1]:
        raise ScaleError(
            f"scale grid shape {tuple(grid.shape)} with block size {tuple(block_size)} does not cover "
            f"rows {r0}:{r0 + rows}, cols {c0}:{c0 + cols}",
            path=path,
            key=key,
        )
    return grid[r0 // bm : last_row + 1, c0 // bn : last_col + 1]


# --- no NaN, no inf ---------------------------------------------------------------------------------------
# A byte decodes to NaN/inf under a scale when it is a NaN (or inf) code of its format, or when its value times
# the scale overflows the target dtype. For e4m3fn and e5m2 the magnitude grows with the low 7 bits and the
# NaN/inf codes are the top ones, so the bad bytes of a scale are exactly those whose low 7 bits reach a
# threshold t: a byte in [t, 0x7f] (the max of the bytes read as int8 reaches t) or in [0x80 + t, 0xff] (the
# max read as uint8 reaches 0x80 + t). Two max reductions per chunk, while the table lookup has it in cache.

_LOW7 = np.arange(256, dtype=np.uint8) & 0x7F
_NO_BAD_CODE = 0x80  # a threshold no low-7-bit value reaches


def _bad_codes(fp8_dtype: torch.dtype, scales: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``bad[i, b]``: byte ``b`` times ``scales[i]`` (the reference formula) is not finite in ``dtype``."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    decoded = (values[None, :] * scales.float().cpu()[:, None]).to(dtype)
    return (~torch.isfinite(decoded)).numpy()


def _low7_threshold(bad: np.ndarray) -> int | None:
    """The ``t`` with ``bad[i] == (low 7 bits >= t_i)`` for every scale ``i``, smallest over scales;
    ``_NO_BAD_CODE`` when no byte goes bad; ``None`` when the bad bytes do not have that shape (the fnuz formats,
    whose NaN is 0x80)."""
    per_scale = np.where(bad, _LOW7, _NO_BAD_CODE).min(axis=1)
    if not np.array_equal(bad, _LOW7[None, :] >= per_scale[:, None]):
        return None
    return int(per_scale.min())


class _BadByteWatch:
    """Whether a weight's decoded values must be scanned for NaN/inf, decided from the bytes the decode reads.

    ``threshold`` (from the scales) is the smallest low-7-bit value that goes bad; ``None`` means the bad bytes
    cannot be told by a threshold, so the output is always scanned. Valid checkpoints never scan: their largest
    byte is 0x7e (448), below e4m3fn's NaN code 0x7f.
    """

    def __init__(self, threshold: int | None) -> None:
        self.threshold = threshold
        self.needs_scan = threshold is None or threshold == 0

    @classmethod
    def for_scales(cls, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> _BadByteWatch:
        """The watch for ``weight`` under any of ``scales``: the bad bytes of the largest ``|scale|``, since a
        larger multiplier only adds overflows (NaN codes are bad under every scale)."""
        if not weight.numel() or not scales.numel():
            return cls(_NO_BAD_CODE)
        worst = scales.abs().amax().reshape(1)
        return cls(_low7_threshold(_bad_codes(weight.dtype, worst, dtype)))

    def see(self, chunk: np.ndarray) -> None:
        """Note the uint8 bytes of one chunk of the weight."""
        if self.needs_scan or self.threshold == _NO_BAD_CODE or not chunk.size:
            return
        self.needs_scan = (
            int(chunk.view(np.int8).max()) >= self.threshold or int(chunk.max()) >= 0x80 + self.threshold
        )

    def unseen(self) -> None:
        """The decode path read the bytes without showing them (torch paths): scan unless nothing can go bad."""
        self.needs_scan = self.needs_scan or self.threshold != _NO_BAD_CODE


def _refuse_non_finite(
    weight: torch.Tensor,
    out: torch.Tensor,
    scale_at: Callable[[tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype,
    *,
    key: str | None,
    path: str | Path | None,
) -> None:
    """Raise NonFiniteWeightError for the first NaN/inf of ``out``, saying whether its byte is a NaN/inf code
    of the format or its value times ``scale_at(position)`` overflows ``dtype``."""
    bad = ~torch.isfinite(out)
    if not bool(bad.any()):
        return
    position = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    byte = int(weight.view(torch.uint8)[position].item())
    stored = weight[position].float().item()
    value = out[position].item()
    fmt = str(weight.dtype).removeprefix("torch.")
    if not math.isfinite(stored):
        kind = "an inf" if math.isinf(stored) else "a NaN"
        why = f"stored byte {byte:#04x} is {kind} code of {fmt}"
    else:
        scale = float(scale_at(position))
        why = (
            f"stored value {stored} (byte {byte:#04x}) times scale {scale:g} overflows "
            f"{str(dtype).removeprefix('torch.')}"
        )
    raise NonFiniteWeightError(
        f"dequantized value at {position} is {value}: {why} ({int(bad.sum())} non-finite value(s) of "
        f"{out.numel()})",
        path=path,
        key=key,
    )
