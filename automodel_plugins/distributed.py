"""DTensor-aware tensor placement: which region of the global tensor this rank holds, and writing into it.

A parameter sharded by FSDP2 (``fully_shard``) or tensor parallelism (``distribute_tensor``) is a DTensor
whose local shard is one rectangular region of the global tensor. The loader reads only that region from the
checkpoint (and dequantizes it with the matching scale), so no rank ever reads or holds the whole model.
"""

from __future__ import annotations

import torch

from automodel_plugins.errors import CheckpointError

Region = tuple[slice, ...]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_region(tensor: torch.Tensor) -> Region | None:
    """The region of the global tensor this rank holds, or None when it holds all of it (a plain tensor).

    Handles ``Shard(d)`` on any dim, several mesh dims, uneven and empty shards, and ``Replicate``. A strided
    shard (FSDP2 over a tensor-parallel dim) is not one rectangle and is refused rather than read wrong.
    """
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in tensor.placements:
        if not isinstance(placement, (Shard, Replicate)) or type(placement).__name__ == "_StridedShard":
            raise CheckpointError(
                f"cannot load into a DTensor placed as {placement!r}: its local shard is not one region of the "
                "global tensor (load before composing FSDP2 over a tensor-parallel dim, or use Shard/Replicate)"
            )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    region = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
    if all(r.start == 0 and r.stop == full for r, full in zip(region, tensor.shape, strict=True)):
        return None
    return region


@torch.no_grad()
def write_local(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (this rank's region) into ``target``'s local storage."""
    local = target.to_local() if is_dtensor(target) else target
    if tuple(local.shape) != tuple(value.shape):
        raise CheckpointError(
            f"local shard shape {tuple(local.shape)} does not match the region read {tuple(value.shape)}"
        )
    local.copy_(value)
