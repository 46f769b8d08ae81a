"""FP8 weight quantization: a float weight to ``(fp8 data, scale)`` with ``dequant = data.float() * scale``.

Used to write FP8 checkpoints (the author kit's test checkpoints, and saving a model in an FP8 format). A scale
maps the weight's (or the block's) largest magnitude onto the format's largest finite value; the division uses
the scale exactly as stored, so a rounded (bf16 / E8M0) scale stays consistent with the fp8 values.
"""

from __future__ import annotations

import torch

from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import check_block_size, decode_scale, encode_scale, grid_shape

__all__ = ["quantize"]


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
        stored = encode_scale(_amax_scale(amax, fp8_max), scale_dtype)
        expanded = decode_scale(stored)
    else:
        check_block_size(block_size, None, None)
        if w.dim() != 2:
            raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(w.shape)}")
        stored = encode_scale(_amax_scale(_block_amax(w, tuple(block_size)), fp8_max), scale_dtype)
        bm, bn = block_size
        grid = decode_scale(stored)
        expanded = grid.repeat_interleave(bm, 0)[: w.shape[0]].repeat_interleave(bn, 1)[:, : w.shape[1]]
    quantized = (w / expanded).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return quantized, stored
