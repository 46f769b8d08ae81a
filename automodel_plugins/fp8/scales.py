"""FP8 scales: decoding the stored dtypes into fp32 multipliers, encoding them back, and refusing bad ones.

A scale is 0-d (one per tensor) or a grid of one value per ``block_size`` block, partial at the edges. Stored
as fp32, bf16 or fp16, or as E8M0 exponent bytes (``uint8`` / ``float8_e8m0fnu``, value ``2**(b-127)``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from automodel_plugins.errors import ScaleError

__all__ = [
    "E8M0_DTYPE",
    "SCALE_DTYPES",
    "check_block_size",
    "check_scale_header",
    "check_scale_shape",
    "decode_activation_scale",
    "decode_scale",
    "encode_scale",
    "grid_shape",
    "validate_scale",
]

E8M0_DTYPE: torch.dtype | None = getattr(torch, "float8_e8m0fnu", None)
FLOAT_SCALE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
SCALE_DTYPES: frozenset[torch.dtype] = (
    FLOAT_SCALE_DTYPES | {torch.uint8} | ({E8M0_DTYPE} if E8M0_DTYPE is not None else set())
)


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as float32 multipliers: float dtypes upcast; E8M0 exponent bytes become ``2**(b-127)``
    (byte 255 is NaN by the E8M0 spec)."""
    if scale.dtype in FLOAT_SCALE_DTYPES or scale.dtype == E8M0_DTYPE:
        return scale.float()
    if scale.dtype == torch.uint8:
        decoded = (scale.to(torch.float32) - 127.0).exp2()
        return decoded.masked_fill(scale == 255, float("nan"))
    raise ScaleError(f"unsupported scale dtype {scale.dtype}; expected one of {dtype_names(SCALE_DTYPES)}")


def decode_activation_scale(
    scale: torch.Tensor, count: int, *, key: str | None = None, path: str | Path | None = None
) -> torch.Tensor:
    """A static activation scale as its module holds it: fp32, 0-d for a linear layer (``count`` 1), ``[E]`` for
    fused experts (``count`` E, one per expert), as transformers' ``FP8Linear`` / ``FP8Experts`` declare it.
    Refused unless it holds ``count`` finite, positive values: its FP8 matmul divides the input by it."""
    if scale.numel() != count:
        raise ScaleError(
            f"static activation scale of shape {tuple(scale.shape)} does not hold the {count} value(s) expected "
            f"({'one per tensor' if count == 1 else 'one per expert'})",
            path=path,
            key=key,
        )
    decoded = decode_scale(scale).reshape(() if count == 1 else (count,))
    if not bool((torch.isfinite(decoded) & (decoded > 0)).all()):
        raise ScaleError("static activation scale is not finite and positive", path=path, key=key)
    return decoded


def dtype_names(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def grid_shape(weight_shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, int]:
    """Scale grid for a 2-D weight: one scale per (possibly partial) block."""
    out_features, in_features = weight_shape
    return math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1])


def check_block_size(block_size: tuple[int, int], key: str | None, path: str | Path | None) -> None:
    if len(block_size) != 2 or not all(isinstance(b, int) and b > 0 for b in block_size):
        raise ScaleError(f"block size {tuple(block_size)} is not two positive integers", path=path, key=key)


def check_scale_shape(
    scale_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int] | None,
    key: str | None,
    path: str | Path | None,
) -> None:
    """Per-tensor: one element; block: exactly the (ceil(out/bm), ceil(in/bn)) grid of a 2-D weight."""
    scale_shape = tuple(scale_shape)
    if block_size is None:
        if math.prod(scale_shape) != 1 or len(scale_shape) > 2:
            raise ScaleError(
                f"per-tensor scale must hold one element, got shape {scale_shape} "
                f"for weight shape {tuple(weight_shape)}",
                path=path,
                key=key,
            )
        return
    check_block_size(block_size, key, path)
    if len(weight_shape) != 2:
        raise ScaleError(
            f"block scales need a 2-D weight, got weight shape {tuple(weight_shape)}", path=path, key=key
        )
    expected = grid_shape(tuple(weight_shape), tuple(block_size))
    if scale_shape != expected:
        raise ScaleError(
            f"scale grid shape {scale_shape} does not fit weight shape {tuple(weight_shape)} "
            f"with block size {tuple(block_size)}: expected {expected}",
            path=path,
            key=key,
        )


def check_scale_header(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    *,
    weight_shape: tuple[int, ...],
    block_size: tuple[int, int] | None,
    key: str,
    path: str | Path | None = None,
) -> None:
    """What a header alone says about a scale: a scale dtype, and the shape its weight and block size need.
    Planning checks this for every FP8 weight, so ``inspect`` refuses what the load would."""
    if dtype not in SCALE_DTYPES:
        raise ScaleError(f"scale dtype {dtype} is not one of {dtype_names(SCALE_DTYPES)}", path=path, key=key)
    check_scale_shape(shape, tuple(weight_shape), block_size, key, path)


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
    check_scale_header(
        scale.dtype, tuple(scale.shape), weight_shape=weight_shape, block_size=block_size, key=key, path=path
    )
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


def encode_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Store fp32 scales in ``scale_dtype``; E8M0 formats round up to a power of two so nothing overflows."""
    if scale_dtype in FLOAT_SCALE_DTYPES:
        return scale.to(scale_dtype)
    if scale_dtype == torch.uint8 or scale_dtype == E8M0_DTYPE:
        exponent = torch.ceil(torch.log2(scale)).clamp(-127, 127)
        encoded = (exponent + 127).to(torch.uint8)
        return encoded if scale_dtype == torch.uint8 else encoded.view(E8M0_DTYPE)
    raise ValueError(f"unsupported scale dtype {scale_dtype}; expected one of {dtype_names(SCALE_DTYPES)}")
