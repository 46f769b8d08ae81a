"""Merging a LoRA delta into FP8-resident fused experts, expert by expert, back into FP8 codes.

Stock PEFT merges a ``target_parameters`` adapter with ``param.data += delta`` (the delta cast to the weight's
dtype). For :class:`~automodel_plugins.model.fp8_experts.Fp8Experts` each expert this rank holds is dequantized
(the loader's ``dequantize``: exactly what a dequantize-at-load model holds), the delta added in the compute dtype
as stock adds it, and:

* an expert whose values did not move (its delta rounds away, or is zero: an expert no token reached keeps
  ``lora_B``'s zero init) keeps its codes and its scales, byte for byte;
* a moved expert is re-quantized with **fresh** block scales (``amax / fp8_max`` per block, in the module's scale
  dtype: the save path's policy with no source scale, :func:`~automodel_plugins.model.requantize.requantize_values`),
  so the merged model stays FP8-resident (one byte a parameter) and any save writes it as FP8.

The result is within one FP8 rounding of the stock merge. Under FSDP2 the codes are a ``DTensor`` sharded over
experts (``Shard(0)``): each rank merges the experts it holds, and the fresh scale cells (the grids are replicated
buffers) are summed over the mesh so that every rank holds the same grids; every rank must call this together. Under expert parallelism the grids are sharded with the codes
(``Shard(0)``): each rank re-quantizes its experts into its own grids and nothing is exchanged.
:class:`MergeRecord` keeps what was replaced, so PEFT's ``unmerge_adapter`` restores the codes bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.scales import decode_scale
from automodel_plugins.model.placement import is_dtensor, local_region
from automodel_plugins.model.requantize import requantize_values

if TYPE_CHECKING:
    from automodel_plugins.model.fp8_experts import Fp8Experts

__all__ = ["MergeRecord", "merge_expert_delta", "restore_merged"]


@dataclass(frozen=True)
class MergeRecord:
    """What a merge replaced in one fused tensor: the moved local experts' codes and the whole scale grid."""

    name: str
    local_experts: tuple[int, ...]
    """Local indices (into this rank's shard) of the experts whose codes were replaced."""
    codes: torch.Tensor
    """``[len(local_experts), R, C]`` ``uint8``: their codes before."""
    scale: torch.Tensor
    """The fp32 grid before (every expert where the grid is replicated; this rank's under expert parallelism)."""
    moved: tuple[int, ...]
    """The moved experts (global indices: every rank's; this rank's under expert parallelism)."""


@torch.no_grad()
def merge_expert_delta(
    experts: Fp8Experts,
    name: str,
    delta_of: Callable[[int], torch.Tensor],
    *,
    safe_merge: bool = False,
    key: str = "",
) -> MergeRecord:
    """Add ``delta_of(e)`` (``[R, C]``, expert ``e`` of the fused tensor ``name``) to every expert this rank
    holds and re-quantize the moved ones with fresh scales (see the module doc)."""
    param = getattr(experts, name)
    local = param.to_local() if is_dtensor(param) else param.data
    first = _first_expert(param, key or name)
    grid = experts.scale(name)
    sharded_grid = is_dtensor(grid)  # expert parallelism: this rank's experts' grids only
    scale = grid.to_local() if sharded_grid else grid
    grid_region = local_region(grid)  # (FSDP2 over the EP shard may hold fewer experts' codes than grids)
    row0 = 0 if grid_region is None else grid_region[0].start  # expert ``e``'s grid row is ``e - row0``
    before = scale.clone()
    fresh = torch.zeros_like(scale)
    moved = torch.zeros(scale.shape[0], dtype=torch.int64, device=scale.device)
    changed, saved = [], []
    for i in range(local.shape[0]):
        expert = first + i
        values = dequantize(
            local[i].view(experts.fp8_dtype),
            scale[expert - row0],
            dtype=experts.compute_dtype,
            block_size=experts.block_size,
            key=f"{key or name}[{expert}]",
        )
        merged = values + delta_of(expert).to(device=values.device, dtype=values.dtype)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"NaNs detected in the merged weights of {key or name} (expert {expert}): the adapter seems "
                "to be broken"
            )
        if torch.equal(merged, values):
            continue
        codes, stored = requantize_values(experts, f"{key or name}[{expert}]", merged)
        changed.append(i)
        saved.append(local[i].clone())
        local[i].copy_(codes.view(torch.uint8))
        fresh[expert - row0] = decode_scale(stored).to(fresh.device)
        moved[expert - row0] = 1
    if is_dtensor(param) and not sharded_grid:
        group = param.device_mesh.get_group()
        torch.distributed.all_reduce(fresh, group=group)
        torch.distributed.all_reduce(moved, group=group)
    mask = moved.bool()
    scale[mask] = fresh[mask]
    codes_before = torch.stack(saved) if saved else local.new_empty((0, *local.shape[1:]))
    moved_experts = tuple(row0 + int(e) for e in mask.nonzero().flatten().tolist())
    return MergeRecord(name, tuple(changed), codes_before, before, moved_experts)


@torch.no_grad()
def restore_merged(experts: Fp8Experts, record: MergeRecord) -> None:
    """Put back what :func:`merge_expert_delta` replaced (codes and scales, bit for bit)."""
    param = getattr(experts, record.name)
    local = param.to_local() if is_dtensor(param) else param.data
    for i, codes in zip(record.local_experts, record.codes, strict=True):
        local[i].copy_(codes)
    grid = experts.scale(record.name)
    (grid.to_local() if is_dtensor(grid) else grid).copy_(record.scale)


def _first_expert(param: torch.Tensor, key: str) -> int:
    """The first expert of this rank's shard: whole experts only (FSDP2's or expert parallelism's ``Shard(0)``)."""
    region = local_region(param)
    if region is None:
        return 0
    for part, size in zip(region[1:], param.shape[1:], strict=True):
        if (part.start, part.stop) != (0, size):
            raise NotImplementedError(
                f"{key}: merging LoRA into FP8 experts needs each rank to hold whole experts (Shard(0)); this "
                f"tensor is placed as {tuple(param.placements)!r}"
            )
    return region[0].start
