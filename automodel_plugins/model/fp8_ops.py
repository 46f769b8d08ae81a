"""The FP8-resident compute as ``torch.library`` custom ops, so ``torch.compile`` keeps it inside one graph.

The eager code (:func:`~automodel_plugins.fp8.decode.dequantize`: numpy table lookups through ctypes, scale
checks that read values; the row-chunked matmul of :mod:`~automodel_plugins.model.fp8_resident`) cannot be traced
by dynamo: every FP8 layer cost a few graph breaks. Wrapped as opaque ops with fake (shape-only)
implementations, a compiled model calls exactly that eager code, so a compiled step computes every FP8 layer
bit for bit as an eager one:

* ``automodel_plugins::fp8_dequantize(codes, scale, fp8_dtype, block_size, dtype)``: a whole FP8 weight
  (``uint8`` codes, its fp32 scale or grid) dequantized into ``dtype``;
* ``automodel_plugins::fp8_linear(x, codes, scale, bias, fp8_dtype, block_size, compute_dtype, rows_per_chunk)``:
  ``F.linear(x, dequantized codes, bias)``; its autograd saves only ``codes`` and ``scale`` and calls
* ``automodel_plugins::fp8_linear_input_grad(grad_out, codes, scale, ..., x_dtype)``: ``grad_out @ weight``,
  the weight dequantized again.

:func:`~automodel_plugins.model.fp8_resident.fp8_matmul` and ``Fp8Linear.dequantized_weight`` use these ops
only while dynamo traces (``torch.compiler.is_compiling()``); eager calls keep the autograd ``Function`` they always used, so eager
results, speed and what a ``TorchDispatchMode`` sees (it does not look inside a custom op) are unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.model.fp8_resident import (
    DequantLayout,
    linear_dequantized,
    linear_dequantized_input_grad,
)

__all__ = ["fp8_dequantize_op", "fp8_linear_op"]

NAMESPACE = "automodel_plugins"


def _layout(
    fp8_dtype: torch.dtype, block_size: list[int] | None, compute_dtype: torch.dtype, rows_per_chunk: int
) -> DequantLayout:
    block = None if block_size is None else (int(block_size[0]), int(block_size[1]))
    return DequantLayout(fp8_dtype, block, compute_dtype, rows_per_chunk)


@torch.library.custom_op(f"{NAMESPACE}::fp8_dequantize", mutates_args=())
def fp8_dequantize_op(
    codes: torch.Tensor,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
    block_size: list[int] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A whole ``uint8``-coded FP8 weight (``scale``: 0-d or its grid) in ``dtype``: the loader's own
    :func:`~automodel_plugins.fp8.decode.dequantize`."""
    block = None if block_size is None else (int(block_size[0]), int(block_size[1]))
    return dequantize(codes.view(fp8_dtype), scale, dtype=dtype, block_size=block)


@fp8_dequantize_op.register_fake
def _(codes, scale, fp8_dtype, block_size, dtype):  # type: ignore[no-untyped-def]
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op(f"{NAMESPACE}::fp8_linear", mutates_args=())
def fp8_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    fp8_dtype: torch.dtype,
    block_size: list[int] | None,
    compute_dtype: torch.dtype,
    rows_per_chunk: int,
) -> torch.Tensor:
    """``F.linear(x, dequantized codes, bias)``, one weight (or block of rows) alive at a time."""
    layout = _layout(fp8_dtype, block_size, compute_dtype, rows_per_chunk)
    return linear_dequantized(x, codes, scale, bias, layout)


@fp8_linear_op.register_fake
def _(x, codes, scale, bias, fp8_dtype, block_size, compute_dtype, rows_per_chunk):  # type: ignore[no-untyped-def]
    return F.linear(
        x, x.new_empty(codes.shape, dtype=compute_dtype), bias
    )  # dtype and shape rules of F.linear


@torch.library.custom_op(f"{NAMESPACE}::fp8_linear_input_grad", mutates_args=())
def fp8_linear_input_grad_op(
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
    block_size: list[int] | None,
    compute_dtype: torch.dtype,
    rows_per_chunk: int,
    x_dtype: torch.dtype,
) -> torch.Tensor:
    """``grad_out @ weight`` in ``x_dtype``, the weight dequantized again (whole, or a block of rows at a time)."""
    layout = _layout(fp8_dtype, block_size, compute_dtype, rows_per_chunk)
    return linear_dequantized_input_grad(grad_out, codes, scale, layout, x_dtype)


@fp8_linear_input_grad_op.register_fake
def _(grad_out, codes, scale, fp8_dtype, block_size, compute_dtype, rows_per_chunk, x_dtype):  # type: ignore[no-untyped-def]
    return grad_out.new_empty((*grad_out.shape[:-1], codes.shape[1]), dtype=x_dtype)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    """Save only the codes and the scale (never a dequantized weight), as the eager autograd Function does."""
    x, codes, scale, _bias, fp8_dtype, block_size, compute_dtype, rows_per_chunk = inputs
    ctx.save_for_backward(codes, scale)
    ctx.layout = (fp8_dtype, block_size, compute_dtype, rows_per_chunk)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
    codes, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = fp8_linear_input_grad_op(grad_out, codes, scale, *ctx.layout, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None, None, None, None


fp8_linear_op.register_autograd(_backward, setup_context=_setup_context)
