"""Which scale an FP8 weight is saved with: its source scale while its values still fit it, else a fresh one.

Re-encoding a dequantized weight with the scale it was loaded with gives back the source bytes exactly (BF16
keeps 8 significant bits, E4M3 has 4), so a tensor that training did not move past its scale keeps that scale
and round-trips byte for byte: a frozen layer, a model saved right after loading. A tensor (or, for a block
grid, a block) whose largest magnitude grew past what the scale can represent gets a fresh scale,
``amax / fp8_max`` (448 for E4M3), stored in the source scale's dtype.

"Fits" means no value would be clipped by more than FP8's own rounding: ``amax / scale`` at most the largest
finite FP8 value plus half its ulp (464 for E4M3, 61440 for E5M2), since a value up to there rounds to the
largest finite value anyway. The bound must reach past 448: an untouched E4M3 value of 448 dequantized to
BF16 can come back as ``448 * (1 + 2**-9) * scale`` (BF16 rounds the product), and would otherwise be
rescaled for nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from automodel_plugins.fp8.encode import amax_scale
from automodel_plugins.fp8.scales import E8M0_DTYPE, decode_scale, encode_scale

__all__ = ["ScaleChoice", "choose_scale", "fit_limit"]


def fit_limit(fp8_dtype: torch.dtype) -> float:
    """The largest ``|value| / scale`` that encodes without clipping: the largest finite FP8 value plus half
    its ulp (464.0 for ``float8_e4m3fn``)."""
    info = torch.finfo(fp8_dtype)
    ulp = info.eps * 2.0 ** math.floor(math.log2(info.max))
    return info.max + ulp / 2


@dataclass(frozen=True)
class ScaleChoice:
    """The scale to store, and how many of its values (1 per tensor, or one per block) were kept from the
    source or made fresh."""

    stored: torch.Tensor
    kept: int
    fresh: int

    @property
    def all_kept(self) -> bool:
        return self.fresh == 0


def choose_scale(
    amax: torch.Tensor,
    *,
    source: torch.Tensor | None,
    scale_dtype: torch.dtype,
    fp8_dtype: torch.dtype,
) -> ScaleChoice:
    """The stored scale for a weight whose (finite, global) ``amax`` is given: 0-d, or one per block.

    ``source``: the scale the weight was loaded with, as stored (same shape as ``amax``, or one element for a
    per-tensor ``amax``); ``None`` makes every value fresh. The result has the source's shape and
    ``scale_dtype``.
    """
    shape = tuple(source.shape) if source is not None else tuple(amax.shape)
    amax = amax.float().reshape(shape)
    fresh = encode_scale(amax_scale(amax, fp8_dtype), scale_dtype)
    if source is None:
        return ScaleChoice(fresh, kept=0, fresh=fresh.numel())
    if source.dtype != scale_dtype:
        source = encode_scale(decode_scale(source), scale_dtype)
    keep = (amax / decode_scale(source).to(amax.device)) <= fit_limit(fp8_dtype)
    stored = _where(keep, source.to(fresh.device), fresh)
    kept = int(keep.sum())
    return ScaleChoice(stored, kept=kept, fresh=keep.numel() - kept)


def _where(condition: torch.Tensor, kept: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``torch.where`` for every scale dtype (E8M0 through its bytes)."""
    if kept.dtype == E8M0_DTYPE:
        return torch.where(condition, kept.view(torch.uint8), fresh.view(torch.uint8)).view(E8M0_DTYPE)
    return torch.where(condition, kept, fresh)
