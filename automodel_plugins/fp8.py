"""FP8 weight dequantization (per-tensor and block scales) and its inverse for test checkpoints.

The product is always taken in fp32 and cast once to the target dtype: that is what transformers' own
dequant does, so results are bit-identical to it (a bf16 x bf16 product would not be). Elementwise math
on fp8 tensors is not implemented on CPU, so weights are upcast before any arithmetic.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import torch

from automodel_plugins.errors import ScaleError

FP8_DTYPES: frozenset[torch.dtype] = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# All of these are MULTIPLIED into the fp8 weight: the "inv" is a misnomer kept by DeepSeek/Mistral/Qwen.
WEIGHT_SCALE_SUFFIXES: tuple[str, ...] = ("weight_scale_inv", "weight_scale", "qscale_weight")
# Static input-activation scales: meaningless once weights are bf16, so loaders drop them.
ACTIVATION_SCALE_SUFFIXES: tuple[str, ...] = ("activation_scale", "input_scale", "qscale_act")

E8M0_DTYPE: torch.dtype | None = getattr(torch, "float8_e8m0fnu", None)
_FLOAT_SCALE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
SCALE_DTYPES: frozenset[torch.dtype] = (
    _FLOAT_SCALE_DTYPES | {torch.uint8} | ({E8M0_DTYPE} if E8M0_DTYPE is not None else set())
)
# Rows per dequant chunk are chosen so the fp32 temporaries stay near this many elements (4 MiB).
_CHUNK_ELEMENTS = 1 << 20


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the float8 weight dtypes (E8M0 is a scale format, not a weight format)."""
    return dtype in FP8_DTYPES


def _sibling_keys(weight_key: str, suffixes: tuple[str, ...]) -> list[str]:
    """``a.b.weight`` -> ``a.b.<suffix>``; a bare parameter (``experts.gate_up_proj``) -> ``<key>_<suffix>``
    for the suffixes that keep their meaning there (transformers' MoE convention: ``gate_up_proj_scale_inv``)."""
    if weight_key == "weight" or weight_key.endswith(".weight"):
        base = weight_key[: -len("weight")]
        return [base + suffix for suffix in suffixes]
    return [
        f"{weight_key}_{suffix.removeprefix('weight_')}" for suffix in suffixes if not suffix.startswith("q")
    ]


def scale_key_candidates(weight_key: str) -> list[str]:
    """Names a weight's scale may have on disk, most common first."""
    return _sibling_keys(weight_key, WEIGHT_SCALE_SUFFIXES)


def activation_key_candidates(weight_key: str) -> list[str]:
    """Names a weight's static activation scale may have on disk (to be dropped)."""
    return _sibling_keys(weight_key, ACTIVATION_SCALE_SUFFIXES)


# --- scales ---------------------------------------------------------------------------------------------


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as float32 multipliers: float dtypes upcast; E8M0 exponent bytes become ``2**(b-127)``
    (byte 255 is NaN by the E8M0 spec)."""
    if scale.dtype in _FLOAT_SCALE_DTYPES or scale.dtype == E8M0_DTYPE:
        return scale.float()
    if scale.dtype == torch.uint8:
        decoded = (scale.to(torch.float32) - 127.0).exp2()
        return decoded.masked_fill(scale == 255, float("nan"))
    raise ScaleError(f"unsupported scale dtype {scale.dtype}; expected one of {_dtype_names(SCALE_DTYPES)}")


def _dtype_names(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def grid_shape(weight_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    """Scale grid for a 2-D weight: one scale per (possibly partial) block."""
    out_features, in_features = weight_shape
    return math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1])


def _check_block_size(block_size: tuple[int, int], key: str | None, path: str | Path | None) -> None:
    if len(block_size) != 2 or not all(isinstance(b, int) and b > 0 for b in block_size):
        raise ScaleError(f"block size {tuple(block_size)} is not two positive integers", path=path, key=key)


def _check_scale_shape(
    scale: torch.Tensor,
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int] | None,
    key: str | None,
    path: str | Path | None,
) -> None:
    """Per-tensor: one element; block: exactly the (ceil(out/bm), ceil(in/bn)) grid of a 2-D weight."""
    if block_size is None:
        if scale.numel() != 1 or scale.dim() > 2:
            raise ScaleError(
                f"per-tensor scale must hold one element, got shape {tuple(scale.shape)} "
                f"for weight shape {tuple(weight_shape)}",
                path=path,
                key=key,
            )
        return
    _check_block_size(block_size, key, path)
    if len(weight_shape) != 2:
        raise ScaleError(
            f"block scales need a 2-D weight, got weight shape {tuple(weight_shape)}", path=path, key=key
        )
    expected = grid_shape(tuple(weight_shape), tuple(block_size))
    if tuple(scale.shape) != expected:
        raise ScaleError(
            f"scale grid shape {tuple(scale.shape)} does not fit weight shape {tuple(weight_shape)} "
            f"with block size {tuple(block_size)}: expected {expected}",
            path=path,
            key=key,
        )


def validate_scale(
    scale: torch.Tensor,
    *,
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int] | None,
    key: str,
    path: str | Path | None = None,
) -> None:
    """Refuse a scale that would silently poison the weights: wrong dtype or shape, or any value that is
    not finite and strictly positive (NaN, inf, 0, negative)."""
    if scale.dtype not in SCALE_DTYPES:
        raise ScaleError(
            f"scale dtype {scale.dtype} is not one of {_dtype_names(SCALE_DTYPES)}", path=path, key=key
        )
    _check_scale_shape(scale, tuple(weight_shape), block_size, key, path)
    decoded = decode_scale(scale)
    bad = ~(torch.isfinite(decoded) & (decoded > 0))
    if not bool(bad.any()):
        return
    position = tuple(int(i) for i in torch.nonzero(bad)[0].tolist()) if scale.dim() else ()
    value = decoded[position].item()
    raw = ""
    if scale.dtype in (torch.uint8, E8M0_DTYPE):
        raw = f" (stored byte {int(scale.view(torch.uint8)[position].item())})"
    raise ScaleError(
        f"scale value {value}{raw} at position {position} is not finite and positive "
        f"({int(bad.sum())} bad value(s) of {scale.numel()})",
        path=path,
        key=key,
    )


# --- dequantize ------------------------------------------------------------------------------------------


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


def _lut_ok(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        weight.device.type == "cpu"
        and is_fp8(weight.dtype)
        and dtype.itemsize in _BITS
        and weight.numel() >= _LUT_MIN_ELEMENTS
        and weight.numel() % 2 == 0
        and weight.is_contiguous()
    )


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
    pairs = weight.view(torch.uint8).reshape(-1).numpy().view(np.uint16)
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
    if not _lut_ok(weight, torch.float32):
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
    source = weight.view(torch.uint8).numpy()
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
    if _lut_ok(weight, dtype):
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
    if _lut_ok(weight, dtype) and rows and cols:
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
    _check_block_size(block_size, None, None)
    if weight.dim() != 2 or decoded.dim() != 2:
        raise ScaleError(
            f"block scales need a 2-D weight and grid, got weight {tuple(weight.shape)}, grid {tuple(scale.shape)}"
        )
    origin = _region_origin(region, tuple(weight.shape))
    if region is None:
        _check_scale_shape(scale, tuple(weight.shape), block_size, None, None)
    return _dequantize_blocks(weight, decoded, dtype, tuple(block_size), origin)


# --- quantize (test checkpoints) -------------------------------------------------------------------------


def _encode_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Store fp32 scales in ``scale_dtype``; E8M0 formats round up to a power of two so nothing overflows."""
    if scale_dtype in _FLOAT_SCALE_DTYPES:
        return scale.to(scale_dtype)
    if scale_dtype == torch.uint8 or scale_dtype == E8M0_DTYPE:
        exponent = torch.ceil(torch.log2(scale)).clamp(-127, 127)
        encoded = (exponent + 127).to(torch.uint8)
        return encoded if scale_dtype == torch.uint8 else encoded.view(E8M0_DTYPE)
    raise ValueError(f"unsupported scale dtype {scale_dtype}; expected one of {_dtype_names(SCALE_DTYPES)}")


def _amax_scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """fp32 scale mapping ``amax`` onto the fp8 range; an all-zero block gets scale 1."""
    return torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))


def _block_amax(weight: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Per-block max |w| over the grid, padding partial edge blocks with zeros."""
    rows, cols = weight.shape
    bm, bn = block_size
    grid_rows, grid_cols = grid_shape((rows, cols), block_size)
    padded = torch.zeros(grid_rows * bm, grid_cols * bn, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.abs()
    return padded.view(grid_rows, bm, grid_cols, bn).amax(dim=(1, 3))


def quantize(
    weight: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    scale_dtype: torch.dtype = torch.float32,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to ``(weight_fp8, scale)`` with ``dequant = weight_fp8.float() * scale``.

    Per-tensor (0-d scale) or per-block (grid including partial edge blocks). The division uses the
    scale exactly as stored, so a rounded (bf16 / E8M0) scale stays consistent with the fp8 values.
    """
    if not is_fp8(fp8_dtype):
        raise ValueError(f"{fp8_dtype} is not an fp8 weight dtype")
    w = weight.float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight with NaN or inf values")
    fp8_max = torch.finfo(fp8_dtype).max
    if block_size is None:
        amax = w.abs().amax() if w.numel() else torch.zeros((), device=w.device)
        stored = _encode_scale(_amax_scale(amax, fp8_max), scale_dtype)
        expanded = decode_scale(stored)
    else:
        _check_block_size(block_size, None, None)
        if w.dim() != 2:
            raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(w.shape)}")
        stored = _encode_scale(_amax_scale(_block_amax(w, tuple(block_size)), fp8_max), scale_dtype)
        bm, bn = block_size
        grid = decode_scale(stored)
        expanded = grid.repeat_interleave(bm, 0)[: w.shape[0]].repeat_interleave(bn, 1)[:, : w.shape[1]]
    quantized = (w / expanded).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return quantized, stored
