"""Streaming a planned load into a model, one tensor (or one rank's region of it) at a time.

What a target tensor is decides how its value arrives: a tensor still on the meta device is replaced by a new
one (created on the load's ``device``; a tensor stored as it loads, read whole on CPU, is used in place from the
memory map, never copied, unless the load asks for private copies); a real tensor, plain or a DTensor shard
(FSDP2, tensor parallel), is written in place, reading only the region this rank holds. Dtypes come from the
plan in both cases. A weight the plan keeps FP8 goes to its
:class:`~automodel_plugins.model.fp8_linear.Fp8Linear` as the stored FP8 bytes (the region's bytes on a
sharded model) with its whole scale, and a fused expert tensor kept FP8 to its
:class:`~automodel_plugins.model.fp8_experts.Fp8Experts` piece by piece (each piece's bytes into its rows, its
grid into its cells of the stacked grid): no dequantized copy is made. No value becomes NaN or inf on the way: FP8
data is checked as it is dequantized, and a conversion to a narrower float dtype that overflows is refused. A
shard modified in place while it was read fails the load (one replaced by rename is still read consistently:
see ``checkpoint.shard``).

A tensor assembled from pieces (:class:`~automodel_plugins.adapters.Piece`: a MoE layer's per-expert FP8
tensors, a fused tensor stored transposed) is written piece by piece into its destination (the new tensor, or
this rank's local shard): of each piece only the part overlapping the destination is read, dequantized with
that piece's own scale, and copied into its place, so at most one piece is held beside the destination.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from automodel_plugins.adapters import TensorSource
from automodel_plugins.adapters.pieces import (
    Box,
    PieceGeometry,
    as_slices,
    intersect,
    relative_slices,
    whole_box,
)
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.fp8.decode import check_finite
from automodel_plugins.fp8.scales import decode_scale
from automodel_plugins.fp8.stacked import is_stacked, stacked_grid_shape
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import ACTIVATION_NAME, Fp8Linear
from automodel_plugins.model.fp8_resident import Fp8Resident
from automodel_plugins.model.placement import Region, is_dtensor, local_boxes, local_region, write_local
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.load.plan import LoadPlan, PlannedTensor
from automodel_plugins.pipeline.load.report import LoadReport
from automodel_plugins.pipeline.readers import (
    Action,
    activation_scale_key,
    read_activation_scale,
    read_assembled,
    read_fp8,
    read_scale,
    read_value,
)
from automodel_plugins.progress import progress_bar

__all__ = ["stream_into"]


def stream_into(
    model: nn.Module,
    plan: LoadPlan,
    checkpoint: Checkpoint,
    *,
    device: torch.device | None = None,
    progress: bool | None = None,
    names: Mapping[str, str] | None = None,
    mmap: bool = True,
    devices: Mapping[str, torch.device] | None = None,
) -> LoadReport:
    """Load every planned tensor into ``model``: meta tensors are replaced (on ``device``, CPU by default, or
    the device ``devices`` gives the planned name: a ``device_map``), real ones are written in place (each rank
    its own region). ``names`` maps a planned (stock) name to the tensor's name in ``model`` where they differ
    (inside PEFT tuner layers).

    ``mmap=False``: tensors stored as they load get private copies instead of views of the memory-mapped shards,
    so the model survives its files being truncated or rewritten later (see ``from_pretrained``).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    report = LoadReport(unused_keys_allowed=len(plan.unused_keys))
    started, bytes_before = time.perf_counter(), checkpoint.bytes_read
    targets = model_tensors(model)
    desc = f"loading {checkpoint.total_nbytes() / 2**30:.2f} GiB"
    for planned_name in progress_bar(list(plan), enabled=progress, desc=desc):
        name = names.get(planned_name, planned_name) if names else planned_name
        planned, target = plan[planned_name], targets[name]
        here = devices.get(planned_name, device) if devices else device
        if planned.action == "kept_fp8" and isinstance(_module_of(model, name), Fp8Experts):
            report.pieces += _load_resident_experts(model, name, target, planned, checkpoint, here)
            report.assembled += planned.source.is_assembled
            how: Action = "kept_fp8"
        elif planned.action == "kept_fp8":
            _load_resident(model, name, target, planned.source, checkpoint, here, mmap=mmap)
            how = "kept_fp8"
        elif planned.source.is_assembled:
            how = planned.action
            report.assembled += 1
            report.pieces += _load_assembled(model, name, target, planned, checkpoint, here)
        elif target.is_meta:
            value, how = read_value(
                checkpoint, planned.source, dtype=planned.dtype, device=here, in_place_ok=mmap
            )
            _assign(model, name, target, value)
        else:
            local = target.to_local() if is_dtensor(target) else target
            for region, view in _local_parts(target, local):
                value, how = read_value(
                    checkpoint, planned.source, dtype=planned.dtype, device=target.device, region=region
                )
                write_local(view, value)
        report.tensors += 1
        setattr(report, how, getattr(report, how) + 1)
        kept = activation_scale_key(planned.source) if how == "kept_fp8" else None  # held by the module
        report.dropped_keys.extend(key for key in planned.source.dropped_keys if key != kept)
    checkpoint.check_unchanged()
    report.bytes_read = checkpoint.bytes_read - bytes_before
    report.seconds = time.perf_counter() - started
    return report


def _load_assembled(
    model: nn.Module,
    name: str,
    target: torch.Tensor,
    planned: PlannedTensor,
    checkpoint: Checkpoint,
    device: torch.device,
) -> int:
    """Assemble a tensor from its pieces: into a new tensor for a meta target, else straight into this rank's
    local shard (never a second copy of it). Returns the pieces read."""
    shape = tuple(target.shape)
    if target.is_meta:
        value, read = read_assembled(
            checkpoint, planned.source, shape=shape, dtype=planned.dtype, device=device
        )
        _assign(model, name, target, value)
        return read
    local = target.to_local() if is_dtensor(target) else target
    if local.numel() == 0:
        return 0
    read = 0
    for region, view in _local_parts(target, local):
        with torch.no_grad():
            _, pieces = read_assembled(
                checkpoint,
                planned.source,
                shape=shape,
                dtype=local.dtype,
                device=local.device,
                region=region,
                out=view,
            )
        read += pieces
    return read


def _local_parts(target: torch.Tensor, local: torch.Tensor) -> list[tuple[Region | None, torch.Tensor]]:
    """``(region of the global tensor, the view of this rank's local tensor holding it)``: one for a plain
    tensor or a one-box shard (``local_region``), several for expert tensor parallelism's ``gate_up_proj``."""
    boxes = local_boxes(target)
    if boxes is None or len(boxes) == 1:
        return [(local_region(target), local)]
    return [(region, local[slices]) for region, slices in boxes]


def _load_resident(
    model: nn.Module,
    name: str,
    target: torch.Tensor,
    source: TensorSource,
    checkpoint: Checkpoint,
    device: torch.device,
    *,
    mmap: bool,
) -> None:
    layer = model.get_submodule(name.rpartition(".")[0])
    if not isinstance(layer, Fp8Linear):
        raise TypeError(f"{name!r} is planned FP8-resident but its module is a {type(layer).__name__}")
    region = None if target.is_meta else local_region(target)
    if target.is_meta:
        codes, scale = read_fp8(checkpoint, source, device=device, in_place_ok=mmap)
    else:
        codes, scale = read_fp8(checkpoint, source, device=target.device, region=region)
    # Kept FP8, dequantized in every forward: refuse now what would be NaN or inf there.
    block_size = source.parts()[0].block_size
    check_finite(
        codes,
        scale,
        dtype=layer.compute_dtype,
        block_size=block_size,
        region=region if block_size is not None else None,
        key=source.key,
        path=checkpoint.info(source.key).file,
    )
    layer.load_fp8(codes, scale, _activation_scale(layer, name, source, checkpoint))


def _activation_scale(
    module: Fp8Resident, name: str, source: TensorSource, checkpoint: Checkpoint
) -> torch.Tensor | None:
    """The static activation scale a resident module built with one keeps (read beside the codes)."""
    key = activation_scale_key(source)
    if key is None:
        return None
    leaf = name.rpartition(".")[2]
    buffer = ACTIVATION_NAME if isinstance(module, Fp8Linear) else f"{leaf}_activation_scale"
    held = module._buffers.get(buffer)
    if held is None:
        raise TypeError(
            f"{name!r} has a static activation scale ({key!r}) but its module was built without one"
        )
    return read_activation_scale(checkpoint, key, held.numel())


def _module_of(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _load_resident_experts(
    model: nn.Module,
    name: str,
    target: torch.Tensor,
    planned: PlannedTensor,
    checkpoint: Checkpoint,
    device: torch.device,
) -> int:
    """Put a fused expert tensor's FP8 codes and stacked block grid into its :class:`Fp8Experts`, straight from
    the pieces as stored: each piece's FP8 bytes (only the part this rank's region overlaps) are copied into
    their rows of the ``uint8`` destination (a new tensor for a meta target, else this rank's local shard), and
    each piece's validated scale grid into its cells of the stacked grid: every piece's where the grid is a
    replicated buffer (FSDP2: whole on every rank), only the pieces of this rank's experts where expert
    parallelism placed the grid ``Shard(0)`` too. No dequantized copy is made. Returns the pieces whose bytes
    were read."""
    layer = _module_of(model, name)
    leaf = name.rpartition(".")[2]
    shape = tuple(target.shape)
    block = layer.block_size
    if target.is_meta:
        codes = torch.empty(shape, dtype=torch.uint8, device=device)
    else:
        codes = target.to_local() if is_dtensor(target) else target
    # (global box, this rank's tensor over it): one box each, or two under expert tensor parallelism (the gate
    # half's rows and the up half's, ``_StridedShard``)
    code_parts = _held_parts(None if target.is_meta else target, shape, codes)
    grid_shape = stacked_grid_shape(shape, block)
    grid_target = None if target.is_meta else layer.scale(leaf)
    grid_boxes = _held_boxes(grid_target, grid_shape)
    grid_split = grid_target is not None and local_boxes(grid_target) is not None
    grid_held = tuple(stop - start for start, stop in _local_extent(grid_target, grid_shape))
    scale = torch.empty(grid_held, dtype=torch.float32, device=codes.device)
    grid_parts = [(box, scale[local]) for box, local in grid_boxes]
    read = 0
    for piece in planned.source.parts():
        info = checkpoint.info(piece.key)
        geometry = PieceGeometry.of(piece, shape, len(info.shape))
        cells = _grid_cells(geometry.box, block)
        piece_scale, scale_first, whole_grid = None, 0, None
        for grid_wanted, grid_view in grid_parts:
            cells_held = intersect(cells, grid_wanted)
            if cells_held is None:
                continue
            # a piece stacking several experts (a fused tensor): only the grids of the experts held
            stacked = (
                grid_split
                and len(info.shape) == 3
                and is_stacked(tuple(info.shape), piece.block_size)
                and cells_held[1:] == cells[1:]
            )
            if stacked:
                scale_first = cells_held[0][0] - cells[0][0]
                matrices = (scale_first, cells_held[0][1] - cells[0][0])
                piece_scale = read_scale(checkpoint, piece.stored_source(), matrices)
                grid = decode_scale(piece_scale).reshape(tuple(stop - start for start, stop in cells_held))
                grid_view[relative_slices(cells_held, grid_wanted)] = grid
            else:
                if whole_grid is None:
                    piece_scale, scale_first = read_scale(checkpoint, piece.stored_source()), 0
                    whole_grid = decode_scale(piece_scale).reshape(
                        tuple(stop - start for start, stop in cells)
                    )
                grid_view[relative_slices(cells_held, grid_wanted)] = whole_grid[
                    relative_slices(cells_held, cells)
                ]
        for wanted, view in code_parts:
            overlap = intersect(geometry.box, wanted)
            if overlap is None:
                continue
            if piece_scale is None:
                piece_scale, scale_first = read_scale(checkpoint, piece.stored_source()), 0
            stored_region = geometry.stored_region(overlap)
            whole = stored_region == whole_box(info.shape)
            data = checkpoint.read(piece.key, None if whole else as_slices(stored_region))
            _check_finite_matrices(
                data,
                piece_scale,
                stored_region,
                layer.compute_dtype,
                block,
                piece.key,
                info.file,
                scale_first,
            )
            with torch.no_grad():
                view[relative_slices(overlap, wanted)] = geometry.to_model(data, overlap).view(torch.uint8)
            read += 1
    if target.is_meta:
        layer.load_fp8(leaf, codes, scale)
    else:
        layer.load_scale(leaf, scale)
    activation = _activation_scale(layer, name, planned.source, checkpoint)
    if activation is not None:
        layer.load_activation_scale(f"{leaf}_activation_scale", activation)
    return read


def _held_boxes(target: torch.Tensor | None, shape: tuple[int, ...]) -> list[tuple[Box, Region]]:
    """The boxes of a ``shape`` tensor this rank holds, each with the slices of its local tensor over it."""
    boxes = None if target is None else local_boxes(target)
    if boxes is None:
        return [(whole_box(shape), tuple(slice(None) for _ in shape))]
    return [(tuple((g.start, g.stop) for g in region), local) for region, local in boxes]


def _held_parts(
    target: torch.Tensor | None, shape: tuple[int, ...], local: torch.Tensor
) -> list[tuple[Box, torch.Tensor]]:
    """:func:`_held_boxes` with the views of ``local`` (this rank's tensor) they fill."""
    return [(box, local[slices]) for box, slices in _held_boxes(target, shape)]


def _local_extent(target: torch.Tensor | None, shape: tuple[int, ...]) -> Box:
    """The local shape of ``target`` as a box from 0 (the whole ``shape`` on meta or unsplit)."""
    if target is None:
        return whole_box(shape)
    local = target.to_local() if is_dtensor(target) else target
    return tuple((0, int(size)) for size in local.shape)


def _grid_cells(box: tuple[tuple[int, int], ...], block: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The cells of a stacked block grid that a block-aligned box of the stacked weight covers."""
    *leading, (r0, r1), (c0, c1) = box
    return (
        *leading,
        (r0 // block[0], -(-r1 // block[0])),
        (c0 // block[1], -(-c1 // block[1])),
    )


def _check_finite_matrices(
    data: torch.Tensor,
    scale: torch.Tensor,
    stored_region: tuple[tuple[int, int], ...],
    dtype: torch.dtype,
    block: tuple[int, int],
    key: str,
    path: object,
    scale_first: int = 0,
) -> None:
    """Kept FP8, dequantized in every forward: refuse now what would be NaN or inf there, matrix by matrix
    (``data`` is ``stored_region`` of a 2-D piece or of a stacked one, ``scale`` the piece's scale: whole, or
    the grids of its matrices from ``scale_first`` on)."""
    matrix_region = as_slices(stored_region[-2:])
    if data.dim() == 2:
        check_finite(data, scale, dtype=dtype, block_size=block, region=matrix_region, key=key, path=path)
        return
    first = stored_region[0][0] - scale_first
    for index in range(data.shape[0]):
        check_finite(
            data[index],
            scale[first + index],
            dtype=dtype,
            block_size=block,
            region=matrix_region,
            key=key,
            path=path,
        )


def _assign(model: nn.Module, name: str, target: torch.Tensor, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(target, nn.Parameter):
        module._parameters[leaf] = nn.Parameter(value, requires_grad=target.requires_grad)
    else:
        module._buffers[leaf] = value
