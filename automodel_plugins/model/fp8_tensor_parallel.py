"""The forward of an :class:`~automodel_plugins.model.fp8_linear.Fp8Linear` whose FP8 codes are split by tensor
parallelism (torch's ``ColwiseParallel`` / ``RowwiseParallel`` through ``parallelize_module``, or
:func:`~automodel_plugins.model.tensor_parallel.parallelize_fp8`).

Each rank holds a rectangle of the codes (``Shard(0)``: its output rows; ``Shard(1)``: its input columns) and
the **whole** block-scale grid (or the per-tensor scale), replicated. The grid costs 4 bytes per block
(0.02% of the codes with 128x128 blocks), and holding it whole means a shard boundary may cut a scale block
(2 ranks over 72 rows of 16-row blocks: rank 1 starts at row 36, inside block 2): each rank dequantizes its
rectangle with the grid cells it touches, exactly as the single-process layer does those rows, so the split
is exact whatever the block size. (It is also what FSDP2 composed over tensor parallelism needs: the grid is
not split along FSDP's dim either.)

The math is the single-process layer's (:func:`~automodel_plugins.model.fp8_resident.fp8_matmul`: the graph
keeps only the codes) on the local tensors; the DTensor wrapping around it is what torch's own ``nn.Linear``
would give: column-wise, a replicated input gives a ``Shard(-1)`` output (the input's gradient is partial on
each rank, summed by the hooks); row-wise, an input split on its last dim gives a ``Partial`` output (summed by
the ``RowwiseParallel`` output hook), the bias added once, after the sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from automodel_plugins.errors import TensorParallelError
from automodel_plugins.model.fp8_resident import fp8_matmul
from automodel_plugins.model.placement import local_region

if TYPE_CHECKING:
    from automodel_plugins.model.fp8_linear import Fp8Linear

__all__ = ["sharded_fp8_linear"]


def _split_dim(layer: Fp8Linear, placements: tuple[object, ...]) -> int | None:
    """0 (column-wise: output rows), 1 (row-wise: input columns) or None (replicated)."""
    from torch.distributed.tensor import Replicate, Shard

    if len(placements) == 1 and isinstance(placements[0], Replicate):
        return None
    if len(placements) == 1 and type(placements[0]) is Shard and placements[0].dim % 2 in (0, 1):
        return placements[0].dim % 2
    raise TensorParallelError(
        f"an Fp8Linear ({layer.out_features} x {layer.in_features}, {layer.fp8_dtype}) runs under tensor "
        f"parallelism with its codes split by rows (Shard(0), ColwiseParallel) or columns (Shard(1), "
        f"RowwiseParallel) on one mesh dim, or replicated; its weight is placed {placements!r}"
    )


def _input(layer: Fp8Linear, x: torch.Tensor, wanted: object, split: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    def fits(placement: object) -> bool:
        if isinstance(wanted, Shard):
            return type(placement) is Shard and placement.dim % x.dim() == wanted.dim % x.dim()
        return placement == wanted

    if not isinstance(x, DTensor) or len(x.placements) != 1 or not fits(x.placements[0]):
        got = tuple(x.placements) if isinstance(x, DTensor) else "a plain tensor"
        raise TensorParallelError(
            f"a {split} Fp8Linear ({layer.out_features} x {layer.in_features}) needs its input as a DTensor "
            f"placed ({wanted!r},), got {got!r}: parallelize it with torch's ColwiseParallel / RowwiseParallel "
            "(parallelize_module), whose hooks lay the input out"
        )
    return x


def _global_shape(local: torch.Tensor, last: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = (*local.shape[:-1], last)
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return shape, tuple(reversed(stride))


def sharded_fp8_linear(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a layer whose ``weight`` is a DTensor (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    weight = layer.weight
    mesh, placements = weight.device_mesh, tuple(weight.placements)  # type: ignore[attr-defined]
    split = _split_dim(layer, placements)
    region = local_region(weight)
    origin = (0, 0) if region is None else (region[0].start, region[1].start)
    codes = weight.to_local()  # type: ignore[attr-defined]
    layout = layer._layout(layer.compute_dtype, origin=origin)
    scale = layer.weight_scale_inv  # parallelize_module replicates buffers as DTensors: the whole grid each
    scale = scale.to_local() if isinstance(scale, DTensor) else scale
    bias = layer.bias
    if split is None:
        x_local = _input(layer, x, Replicate(), "replicated").to_local()
        bias_local = bias.to_local() if isinstance(bias, DTensor) else bias
        out = fp8_matmul(x_local, codes, scale, bias_local, layout)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    if split == 0:
        # Each rank's output columns use all of x: x's gradient here is this rank's part of the sum.
        x_local = _input(layer, x, Replicate(), "column-wise").to_local(grad_placements=[Partial()])
        bias_local = bias.to_local() if isinstance(bias, DTensor) else bias
        out = fp8_matmul(x_local, codes, scale, bias_local, layout)
        shape, stride = _global_shape(out, layer.out_features)
        return DTensor.from_local(
            out, mesh, [Shard(out.dim() - 1)], run_check=False, shape=shape, stride=stride
        )
    x_local = _input(layer, x, Shard(x.dim() - 1), "row-wise").to_local()
    out = DTensor.from_local(
        fp8_matmul(x_local, codes, scale, None, layout), mesh, [Partial()], run_check=False
    )
    if bias is None:
        return out
    if not isinstance(bias, DTensor):
        bias = DTensor.from_local(bias, mesh, [Replicate()], run_check=False)
    return out.redistribute(placements=[Replicate()]) + bias
