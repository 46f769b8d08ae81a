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
from dataclasses import dataclass, field

import torch
from torch import nn

from automodel_plugins.adapters import TensorSource
from automodel_plugins.adapters.pieces import (
    PieceGeometry,
    as_slices,
    intersect,
    relative_slices,
    whole_box,
)
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import NonFiniteWeightError, ScaleError
from automodel_plugins.fp8.decode import check_finite, dequantize
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import decode_scale, validate_scale
from automodel_plugins.fp8.stacked import (
    is_stacked,
    stacked_dequantize,
    stacked_grid_shape,
    validate_stacked_scale,
)
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.placement import Region, is_dtensor, local_region, write_local
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.plan import Action, LoadPlan, PlannedTensor, action_for
from automodel_plugins.progress import progress_bar

__all__ = ["LoadReport", "read_assembled", "read_fp8", "read_scale", "read_value", "stream_into"]


@dataclass
class LoadReport:
    """What a load did; attached to the model's composition record.

    ``used_in_place`` counts tensors stored in the dtype the model holds (memory-mapped when assigned whole
    on CPU, copied into an already materialized model); ``kept_fp8`` the FP8 weights held as FP8 by
    FP8-resident layers and experts; ``unused_keys_allowed`` the checkpoint keys a pipeline stage left to the
    other stages. ``assembled`` counts the tensors put together from pieces (also counted by how:
    ``dequantized`` when FP8 pieces were among them, ``kept_fp8`` for resident experts, else ``converted``),
    ``pieces`` the pieces read for them.
    """

    tensors: int = 0
    dequantized: int = 0
    kept_fp8: int = 0
    used_in_place: int = 0
    converted: int = 0
    assembled: int = 0
    pieces: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    unused_keys_allowed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def read_value(
    checkpoint: Checkpoint,
    source: TensorSource,
    *,
    dtype: torch.dtype,
    device: torch.device,
    region: Region | None = None,
    in_place_ok: bool = False,
    shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, Action]:
    """The model's value for ``source`` (or its ``region``) in ``dtype`` on ``device``, and how it was made.

    FP8 data is read (only the region's bytes) and dequantized with its validated scale; other tensors are
    read and cast, or, with ``in_place_ok`` for a whole tensor on CPU already in its dtype, memory-mapped.
    A source assembled from pieces needs the model tensor's ``shape`` (see :func:`read_assembled`).
    """
    if source.is_assembled:
        if shape is None:
            raise ValueError(f"reading a tensor assembled from pieces ({source.key!r}...) needs its shape")
        value, _ = read_assembled(checkpoint, source, shape=shape, dtype=dtype, device=device, region=region)
        return value, "dequantized" if source.is_fp8 else "converted"
    info = checkpoint.info(source.key)
    if source.scale_key is None and is_fp8(info.dtype):
        raise ScaleError(
            "FP8 tensor without a scale reached the loader (the adapter gave none)",
            path=info.file,
            key=source.key,
        )
    action = action_for(info.dtype, fp8=source.is_fp8, dtype=dtype)
    if action == "dequantized":
        scale = read_scale(checkpoint, source)
        data = checkpoint.read(source.key, region).to(device)
        block_region = None if region is None or source.block_size is None else region
        decode = stacked_dequantize if is_stacked(tuple(info.shape), source.block_size) else dequantize
        value = decode(
            data,
            scale.to(device),
            dtype=dtype,
            block_size=source.block_size,
            region=block_region,
            key=source.key,
            path=info.file,
        )
        return value, action
    if action == "used_in_place" and in_place_ok and region is None and device.type == "cpu":
        return checkpoint.tensor(source.key), action
    stored = checkpoint.read(source.key, region)
    if action == "used_in_place":
        return stored.to(device=device), action
    value = stored.to(device=device, dtype=dtype if info.dtype.is_floating_point else info.dtype)
    _refuse_overflow(stored, value, key=source.key, path=info.file)
    return value, action


def _refuse_overflow(stored: torch.Tensor, value: torch.Tensor, *, key: str, path: object) -> None:
    """A float cast to a narrower range (F32 -> F16, BF16 -> F16) must not turn finite values into inf.

    NaN or inf already stored in a float checkpoint are its content, passed through like stock transformers
    does (tensors used in place are not scanned either); only what the conversion itself breaks is refused.
    """
    if not (stored.is_floating_point() and value.is_floating_point()) or not stored.numel():
        return
    limit = torch.finfo(value.dtype).max
    if limit >= torch.finfo(stored.dtype).max:
        return
    low, high = torch.aminmax(stored)  # one pass; the element-wise scan below only when something exceeds
    if not (float(high) > limit or float(low) < -limit):
        return
    overflowed = torch.isinf(value) & torch.isfinite(stored.to(value.device))
    if bool(overflowed.any()):
        position = tuple(int(i) for i in torch.nonzero(overflowed)[0].tolist())
        raise NonFiniteWeightError(
            f"stored value {stored[position].item()} at {position} overflows {value.dtype} "
            f"({int(overflowed.sum())} value(s)): load in a wider dtype",
            path=path,
            key=key,
        )


def read_scale(checkpoint: Checkpoint, source: TensorSource) -> torch.Tensor:
    """The whole scale of an FP8 tensor as stored, refused unless finite, positive and the right shape."""
    scale = checkpoint.read(source.scale_key)
    weight_shape = tuple(checkpoint.info(source.key).shape)
    check = validate_stacked_scale if is_stacked(weight_shape, source.block_size) else validate_scale
    check(
        scale,
        weight_shape=weight_shape,
        block_size=source.block_size,
        key=source.scale_key,
        path=checkpoint.info(source.scale_key).file,
    )
    return scale


def read_assembled(
    checkpoint: Checkpoint,
    source: TensorSource,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    region: Region | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The ``region`` (default: all) of a ``shape`` model tensor assembled from its pieces, in ``dtype``, and how
    many pieces were read.

    Written into ``out`` when given (this rank's local shard, already allocated), else into a new tensor on
    ``device``. Each piece overlapping the region is read as one source of its own (:func:`read_value`: only
    the stored region needed, FP8 dequantized with its own validated scale) and copied into its place, then
    dropped: the largest temporary is one piece.
    """
    target = whole_box(shape) if region is None else tuple((s.start, s.stop) for s in region)
    extent = tuple(stop - start for start, stop in target)
    if out is None:
        out = torch.empty(extent, dtype=dtype, device=device)
    read = 0
    for piece in source.parts():
        geometry = PieceGeometry.of(piece, shape, len(checkpoint.info(piece.key).shape))
        overlap = intersect(geometry.box, target)
        if overlap is None:
            continue
        stored_region = geometry.stored_region(overlap)
        whole = stored_region == whole_box(checkpoint.info(piece.key).shape)
        value, _ = read_value(
            checkpoint,
            piece.stored_source(),
            dtype=dtype,
            device=out.device,
            region=None if whole else as_slices(stored_region),
        )
        out[relative_slices(overlap, target)] = geometry.to_model(value, overlap)
        read += 1
    return out, read


def read_fp8(
    checkpoint: Checkpoint,
    source: TensorSource,
    *,
    device: torch.device,
    region: Region | None = None,
    in_place_ok: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight's codes (only ``region``'s bytes, as stored) and its whole validated scale.

    The bytes go straight into FP8 storage: memory-mapped from the file for a whole tensor on CPU with
    ``in_place_ok``, otherwise read with ``pread`` into a private FP8 tensor (then moved to ``device``).
    """
    scale = read_scale(checkpoint, source)
    if in_place_ok and region is None and device.type == "cpu":
        return checkpoint.tensor(source.key), scale
    return checkpoint.read(source.key, region).to(device), scale


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
            value, how = read_value(
                checkpoint,
                planned.source,
                dtype=planned.dtype,
                device=target.device,
                region=local_region(target),
            )
            write_local(target, value)
        report.tensors += 1
        setattr(report, how, getattr(report, how) + 1)
        report.dropped_keys.extend(planned.source.dropped_keys)
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
    region = local_region(target)
    if local.numel() == 0:
        return 0
    with torch.no_grad():
        _, read = read_assembled(
            checkpoint,
            planned.source,
            shape=shape,
            dtype=local.dtype,
            device=local.device,
            region=region,
            out=local,
        )
    return read


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
    check_finite(
        codes,
        scale,
        dtype=layer.compute_dtype,
        block_size=source.block_size,
        region=region if source.block_size is not None else None,
        key=source.key,
        path=checkpoint.info(source.key).file,
    )
    layer.load_fp8(codes, scale)


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
    each piece's validated scale grid into its cells of the stacked grid (every piece's, so that the replicated
    grid is whole on every rank). No dequantized copy is made. Returns the pieces whose bytes were read."""
    layer = _module_of(model, name)
    leaf = name.rpartition(".")[2]
    shape = tuple(target.shape)
    block = layer.block_size
    region = None if target.is_meta else local_region(target)
    wanted = whole_box(shape) if region is None else tuple((part.start, part.stop) for part in region)
    if target.is_meta:
        codes = torch.empty(shape, dtype=torch.uint8, device=device)
    else:
        codes = target.to_local() if is_dtensor(target) else target
    scale = torch.empty(stacked_grid_shape(shape, block), dtype=torch.float32, device=codes.device)
    read = 0
    for piece in planned.source.parts():
        info = checkpoint.info(piece.key)
        geometry = PieceGeometry.of(piece, shape, len(info.shape))
        piece_scale = read_scale(checkpoint, piece.stored_source())
        cells = _grid_cells(geometry.box, block)
        scale[as_slices(cells)] = decode_scale(piece_scale).reshape(
            tuple(stop - start for start, stop in cells)
        )
        overlap = intersect(geometry.box, wanted)
        if overlap is None:
            continue
        stored_region = geometry.stored_region(overlap)
        whole = stored_region == whole_box(info.shape)
        data = checkpoint.read(piece.key, None if whole else as_slices(stored_region))
        _check_finite_matrices(
            data, piece_scale, stored_region, layer.compute_dtype, block, piece.key, info.file
        )
        with torch.no_grad():
            codes[relative_slices(overlap, wanted)] = geometry.to_model(data, overlap).view(torch.uint8)
        read += 1
    if target.is_meta:
        layer.load_fp8(leaf, codes, scale)
    else:
        layer.load_scale(leaf, scale)
    return read


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
) -> None:
    """Kept FP8, dequantized in every forward: refuse now what would be NaN or inf there, matrix by matrix
    (``data`` is ``stored_region`` of a 2-D piece or of a stacked one, ``scale`` the piece's whole scale)."""
    matrix_region = as_slices(stored_region[-2:])
    if data.dim() == 2:
        check_finite(data, scale, dtype=dtype, block_size=block, region=matrix_region, key=key, path=path)
        return
    first = stored_region[0][0]
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
