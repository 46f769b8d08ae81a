"""FP8 weight quantization: a float weight to ``(fp8 data, scale)`` with ``dequant = data.float() * scale``.

Used to write FP8 checkpoints (the author kit's test checkpoints, and saving a model in an FP8 format). A scale
maps the weight's (or the block's) largest magnitude onto the format's largest finite value; the division uses
the scale exactly as stored, so a rounded (bf16 / E8M0) scale stays consistent with the fp8 values.

Every value is encoded by one formula, ``(v.float() / scale).clamp(-max, max).to(fp8)``, elementwise: a region
of a weight (one rank's shard, one chunk of rows) encodes to exactly the bytes the same region of the whole
weight does. On CPU, a per-tensor scale and 16-bit values (BF16, FP16) go through a table of that formula over
all 65536 bit patterns (one gather per value instead of a cast, bit-identical by construction).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from automodel_plugins.fp8.amax import SERIAL_ELEMENTS, block_amax, row_pieces, tensor_amax
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import check_block_size, decode_scale, encode_scale, grid_shape

__all__ = ["amax_scale", "encode", "quantize"]

_TABLE_MIN_ELEMENTS = 1 << 12  # below this, building the 65536-entry table costs more than it saves
_TABLE_CHUNK = 1 << 16  # indices per gather: stays in cache


def amax_scale(amax: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """fp32 scale mapping ``amax`` onto the fp8 range (``amax / 448`` for E4M3); an all-zero block gets 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / torch.finfo(fp8_dtype).max, torch.ones_like(amax))


def encode(
    values: torch.Tensor,
    scale: torch.Tensor,
    *,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``values`` (finite floats) encoded with ``scale``: fp32 multipliers, 0-d per tensor, or the whole
    grid with ``block_size``, the 2-D ``values`` being the region of the weight at ``origin``."""
    if block_size is None:
        if scale.numel() != 1:
            raise ValueError(f"a per-tensor scale holds one value, got shape {tuple(scale.shape)}")
        return _encode_per_tensor(values, scale.reshape(()).float(), fp8_dtype)
    return _encode_blocks(values, scale.float(), fp8_dtype, block_size, origin)


def _formula(values: torch.Tensor, divisor: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    fp8_max = torch.finfo(fp8_dtype).max
    return (values.float() / divisor).clamp_(-fp8_max, fp8_max).to(fp8_dtype)


def _encode_per_tensor(values: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    if values.device.type != "cpu" or values.dim() < 2:
        return _formula(values, scale.to(values.device), fp8_dtype)
    if values.dtype not in _HALF_VIEWS or values.numel() < _TABLE_MIN_ELEMENTS:
        pieces = [
            _formula(piece, scale, fp8_dtype) for piece in row_pieces(values.reshape(values.shape[0], -1))
        ]
        return torch.cat(pieces).reshape(values.shape)
    table = _half_table(values.dtype, float(scale), fp8_dtype)
    source = values.contiguous().view(_HALF_VIEWS[values.dtype]).reshape(-1).numpy().view(np.uint16)
    out = torch.empty(values.shape, dtype=fp8_dtype)
    target = out.view(torch.uint8).reshape(-1).numpy()
    for start in range(0, source.size, _TABLE_CHUNK):
        np.take(
            table, source[start : start + _TABLE_CHUNK], out=target[start : start + _TABLE_CHUNK], mode="clip"
        )
    return out


_HALF_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


@functools.lru_cache(maxsize=8)
def _half_table(dtype: torch.dtype, scale: float, fp8_dtype: torch.dtype) -> np.ndarray:
    """Entry ``u``: the fp8 byte :func:`_formula` gives the 16-bit value whose bits are ``u`` (built in serial
    pieces: see ``amax.SERIAL_ELEMENTS``)."""
    divisor = torch.tensor(scale, dtype=torch.float32)
    pieces = [_formula(piece, divisor, fp8_dtype) for piece in _all_halves(dtype).split(SERIAL_ELEMENTS)]
    return torch.cat(pieces).view(torch.uint8).numpy().copy()


@functools.lru_cache(maxsize=4)
def _all_halves(dtype: torch.dtype) -> torch.Tensor:
    """The 65536 values of a 16-bit dtype, indexed by their bit pattern."""
    return torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16)).view(dtype)


def _encode_blocks(
    values: torch.Tensor,
    grid: torch.Tensor,
    fp8_dtype: torch.dtype,
    block_size: tuple[int, int],
    origin: tuple[int, int],
) -> torch.Tensor:
    """Each block row of the region divided by its scales, one per column (broadcast over its rows)."""
    if values.dim() != 2:
        raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    block_rows, block_cols = block_size
    row0, col0 = origin
    grid = grid.to(values.device)
    columns = torch.arange(col0, col0 + cols, device=values.device) // block_cols
    out = torch.empty(values.shape, dtype=fp8_dtype, device=values.device)
    row = 0
    while row < rows:
        block_row = (row0 + row) // block_rows
        end = min(rows, (block_row + 1) * block_rows - row0)
        divisor = grid[block_row].index_select(0, columns)
        start = row
        for piece in row_pieces(values[row:end]):
            out[start : start + piece.shape[0]] = _formula(piece, divisor, fp8_dtype)
            start += piece.shape[0]
        row = end
    return out


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
    if block_size is None:
        amax = tensor_amax(weight)
    else:
        check_block_size(block_size, None, None)
        if weight.dim() != 2:
            raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
        block_size = (int(block_size[0]), int(block_size[1]))
        amax = block_amax(weight, block_size, grid_shape(tuple(weight.shape), block_size))
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a weight with NaN or inf values")
    stored = encode_scale(amax_scale(amax, fp8_dtype), scale_dtype)
    return encode(weight, decode_scale(stored), fp8_dtype=fp8_dtype, block_size=block_size), stored
