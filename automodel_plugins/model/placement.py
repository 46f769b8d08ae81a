"""DTensor-aware tensor placement: which region of the global tensor this rank holds, and writing into it.

A parameter sharded by FSDP2 (``fully_shard``) or tensor parallelism (``distribute_tensor``) is a DTensor
whose local shard is one rectangular region of the global tensor. The loader reads only that region from the
checkpoint (and dequantizes it with the matching scale), so no rank ever reads or holds the whole model.

The region follows DTensor's own rules, applied mesh dim by mesh dim, left to right: ``Shard(d)`` splits the
indices this rank still holds along ``d`` the way ``torch.chunk`` does (uneven shards, empty trailing shards);
``_StridedShard(d, split_factor=s)`` (FSDP2 composed over a tensor-parallel dim) first chunks them into ``s``
pieces and takes this rank's chunk of each; ``Replicate`` keeps them. A layout whose result along some dim
is not one run of consecutive indices is refused rather than read wrong.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from automodel_plugins.errors import CheckpointError

Region = tuple[slice, ...]

__all__ = [
    "Region",
    "is_dtensor",
    "local_boxes",
    "local_region",
    "shard_boxes",
    "shard_numel",
    "shard_region",
    "write_local",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


# --- the region, from shape, mesh and placements --------------------------------------------------------


def _chunk(indices: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """``torch.chunk(indices, parts)[index]``, with the empty chunks DTensor pads the list with."""
    size = -(-indices.numel() // parts)
    start = min(index * size, indices.numel())
    return indices[start : start + size]


def _strided_chunk(indices: torch.Tensor, parts: int, index: int, split_factor: int) -> torch.Tensor:
    """``_StridedShard``: ``split_factor`` chunks first, then this rank's chunk of each, concatenated."""
    pieces = [_chunk(indices, split_factor, j) for j in range(split_factor)]
    return torch.cat([_chunk(piece, parts, index) for piece in pieces])


def _placement_kind(placement: object) -> str:
    """``shard``, ``strided`` or ``replicate``; anything else (``Partial``, unknown) cannot hold a weight."""
    from torch.distributed.tensor import Replicate, Shard

    if type(placement).__name__ in ("_StridedShard", "StridedShard") and hasattr(placement, "split_factor"):
        return "strided"
    if isinstance(placement, Shard):
        return "shard"
    if isinstance(placement, Replicate):
        return "replicate"
    return "other"


def _as_slice(indices: torch.Tensor, dim_size: int) -> slice | None:
    """The indices as one step-1 slice, or None when they are not consecutive."""
    if indices.numel() == 0:
        return slice(dim_size, dim_size)
    start = int(indices[0])
    if torch.equal(indices, torch.arange(start, start + indices.numel())):
        return slice(start, start + indices.numel())
    return None


def _held_indices(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[object]
) -> list[torch.Tensor]:
    """The indices along each dim of a ``shape`` tensor held at mesh ``coordinate`` under ``placements``."""
    if not (len(mesh_shape) == len(coordinate) == len(placements)):
        raise ValueError(
            f"mesh shape {tuple(mesh_shape)}, coordinate {tuple(coordinate)} and placements {tuple(placements)!r} "
            "differ in length"
        )
    held = [torch.arange(size) for size in shape]
    for parts, index, placement in zip(mesh_shape, coordinate, placements, strict=True):
        kind = _placement_kind(placement)
        if kind == "other":
            raise CheckpointError(
                f"cannot load into a DTensor placed as {placement!r}: only Shard, _StridedShard and Replicate "
                "placements hold one region of a weight"
            )
        if kind == "replicate":
            continue
        dim = placement.dim % max(len(shape), 1)  # type: ignore[attr-defined]
        if kind == "shard":
            held[dim] = _chunk(held[dim], parts, index)
        else:
            held[dim] = _strided_chunk(held[dim], parts, index, int(placement.split_factor))  # type: ignore[attr-defined]
    return held


def shard_region(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[object]
) -> Region:
    """The region of a ``shape`` tensor held at mesh ``coordinate`` under ``placements`` (one slice per dim).

    Pure: no process group needed. Raises ``CheckpointError`` for a placement that is not a shard or a
    replica, or a layout whose local shard is not one rectangle of the global tensor.
    """
    held = _held_indices(shape, mesh_shape, coordinate, placements)
    region = tuple(_as_slice(indices, size) for indices, size in zip(held, shape, strict=True))
    if any(part is None for part in region):
        raise CheckpointError(
            f"cannot load into a DTensor of shape {tuple(shape)} placed as {tuple(placements)!r} on mesh "
            f"{tuple(mesh_shape)}: the shard at coordinate {tuple(coordinate)} is not one region of the global "
            "tensor (load the tensor-parallel model before applying fully_shard, or use sizes the mesh divides)"
        )
    return region  # type: ignore[return-value]


def shard_numel(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[object]
) -> int:
    """How many elements of a ``shape`` tensor the rank at ``coordinate`` holds under ``placements``, whether or
    not they form one rectangle (a ``_StridedShard`` over a later dim: expert LoRA's ``lora_B`` under expert
    parallelism holds every rank-block's columns of its experts)."""
    held = _held_indices(shape, mesh_shape, coordinate, placements)
    return math.prod(indices.numel() for indices in held)


def local_region(tensor: torch.Tensor) -> Region | None:
    """The region of the global tensor this rank holds, or None when it holds all of it (a plain tensor,
    a replica). A rank outside the DTensor's mesh holds an empty region.

    Handles ``Shard(d)`` on any dim, several mesh dims, uneven and empty shards, ``Replicate``, and
    ``_StridedShard`` where the shard is still one rectangle (FSDP2 over a tensor-parallel dim).
    """
    if not is_dtensor(tensor):
        return None
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return tuple(slice(0, 0) for _ in tensor.shape)
    region = shard_region(tuple(tensor.shape), tuple(mesh.shape), coordinate, tensor.placements)  # type: ignore[attr-defined]
    if all(part.start == 0 and part.stop == size for part, size in zip(region, tensor.shape, strict=True)):
        return None
    return region


def _runs(indices: torch.Tensor) -> list[slice]:
    """``indices`` (increasing) as runs of consecutive indices."""
    if indices.numel() == 0:
        return []
    breaks = (torch.nonzero(indices[1:] - indices[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, indices.numel()]
    return [slice(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


def _held_runs(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[object]
) -> list[list[tuple[slice, slice]]]:
    """Per dim, the runs of consecutive indices held, each as ``(global slice, slice of the local tensor)``."""
    per_dim: list[list[tuple[slice, slice]]] = []
    for indices in _held_indices(shape, mesh_shape, coordinate, placements):
        offset, pairs = 0, []
        for run in _runs(indices):
            pairs.append((run, slice(offset, offset + run.stop - run.start)))
            offset += run.stop - run.start
        per_dim.append(pairs or [(slice(0, 0), slice(0, 0))])
    return per_dim


def shard_boxes(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[object]
) -> list[Region]:
    """The rectangles of a ``shape`` tensor held at mesh ``coordinate`` under ``placements``: one for any layout
    :func:`shard_region` takes, several where a ``_StridedShard``'s runs stay apart. Pure, as it is."""
    if not shape:
        return [()]
    runs = _held_runs(shape, mesh_shape, coordinate, placements)
    return [tuple(g for g, _ in combo) for combo in itertools.product(*runs)]


def local_boxes(tensor: torch.Tensor) -> list[tuple[Region, Region]] | None:
    """The rectangles of the global tensor this rank holds, each as ``(global region, region of the local
    tensor)``; None when it holds all of it. Unlike :func:`local_region` it takes a local shard made of several
    rectangles: a ``_StridedShard`` whose runs stay apart (expert tensor parallelism's ``gate_up_proj``: this
    rank's rows of the gate half and the matching rows of the up half)."""
    if not is_dtensor(tensor):
        return None
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    shape = tuple(tensor.shape)
    if coordinate is None:
        empty = tuple(slice(0, 0) for _ in shape)
        return [(empty, empty)]
    runs = _held_runs(shape, tuple(mesh.shape), coordinate, tensor.placements)  # type: ignore[attr-defined]
    if all(len(r) == 1 and r[0][0] == slice(0, size) for r, size in zip(runs, shape, strict=True)):
        return None
    return [
        (tuple(g for g, _ in combo), tuple(local for _, local in combo)) for combo in itertools.product(*runs)
    ]


@torch.no_grad()
def write_local(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (this rank's region) into ``target``'s local storage."""
    local = target.to_local() if is_dtensor(target) else target  # type: ignore[attr-defined]
    if local.numel() == 0 and value.numel() == 0:
        return  # an empty shard (or a rank outside the mesh): nothing to hold
    if tuple(local.shape) != tuple(value.shape):
        raise CheckpointError(
            f"local shard shape {tuple(local.shape)} does not match the region read {tuple(value.shape)}"
        )
    local.copy_(value)
