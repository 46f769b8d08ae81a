"""What the distributed workers measure: tensors compared bit for bit, and every checkpoint read recorded.

Expectations are computed here independently of ``automodel_plugins.distributed``: a rank's region comes
from ``torch.chunk``'s rule applied to the placements, not from the code under test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from automodel_plugins.checkpoint import Checkpoint

Bounds = list[list[int]] | None  # [[start, stop], ...] per dim, None for the whole tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def chunk_bounds(tensor: torch.Tensor) -> Bounds:
    """This rank's region of a DTensor by ``torch.chunk``'s rule (None: the whole tensor or a plain tensor)."""
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Shard

    bounds = [[0, size] for size in tensor.shape]
    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if not isinstance(placement, Shard):
            continue
        lo, hi = bounds[placement.dim]
        parts = tensor.device_mesh.size(mesh_dim)
        chunk = math.ceil((hi - lo) / parts)
        start = min(lo + coordinate[mesh_dim] * chunk, hi)
        bounds[placement.dim] = [start, min(start + chunk, hi)]
    return None if all(b == [0, s] for b, s in zip(bounds, tensor.shape, strict=True)) else bounds


def _normalize(shape: tuple[int, ...], region: tuple[slice, ...] | None) -> Bounds:
    if region is None:
        return None
    bounds = [[*s.indices(n)[:2]] for s, n in zip(region, shape, strict=False)]
    bounds += [[0, n] for n in shape[len(bounds) :]]
    return None if all(b == [0, n] for b, n in zip(bounds, shape, strict=True)) else bounds


@contextlib.contextmanager
def record_reads() -> Iterator[list[tuple[str, Bounds]]]:
    """Every ``Checkpoint`` data access in the block, as ``(key, bounds)`` (bounds None: the whole tensor)."""
    reads: list[tuple[str, Bounds]] = []
    original = {name: getattr(Checkpoint, name) for name in ("read", "tensor", "slice")}

    def read(self: Checkpoint, key: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        reads.append((key, _normalize(self.info(key).shape, region)))
        return original["read"](self, key, region)

    def whole(self: Checkpoint, key: str) -> torch.Tensor:
        reads.append((key, None))
        return original["tensor"](self, key)

    def part(self: Checkpoint, key: str, region: tuple[slice, ...]) -> torch.Tensor:
        reads.append((key, _normalize(self.info(key).shape, region)))
        return original["slice"](self, key, region)

    Checkpoint.read, Checkpoint.tensor, Checkpoint.slice = read, whole, part  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        for name, function in original.items():
            setattr(Checkpoint, name, function)


_EXPERT_PIECES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""A fused expert parameter and the per-expert projections stacked into it (the FP8 releases' layout)."""


def expert_piece_reads(
    name: str, tensor: torch.Tensor, checkpoint: Checkpoint, *, every_scale: bool = False
) -> list[tuple[str, Bounds]]:
    """What a rank holding ``tensor`` (``[E, rows, cols]``, fused from per-expert pieces) should read: for each
    expert in its dim-0 range, the rows of each projection's piece its region overlaps (whole: None), and that
    piece's whole scale; with ``every_scale`` (FP8-resident experts, whose stacked grid is replicated) every
    expert's scales. Worked out here from the layout, not by the host's geometry."""
    layer, parameter = name.rsplit(".experts.", 1)
    projections = _EXPERT_PIECES[parameter]
    bounds = chunk_bounds(tensor) or [[0, size] for size in tensor.shape]
    rows = tensor.shape[1] // len(projections)
    reads: list[tuple[str, Bounds]] = []
    for expert in range(tensor.shape[0]):
        for index, projection in enumerate(projections):
            key = f"{layer}.experts.{expert}.{projection}.weight"
            low, high = max(bounds[1][0], index * rows), min(bounds[1][1], (index + 1) * rows)
            mine = bounds[0][0] <= expert < bounds[0][1] and low < high
            if mine:
                piece = [[low - index * rows, high - index * rows], bounds[2]]
                whole = piece == [[0, rows], [0, tensor.shape[2]]]
                reads.append((key, None if whole else piece))
            if mine or every_scale:
                reads.append((key + "_scale_inv", None))
    return reads


def expected_reads(
    model: nn.Module, checkpoint: Checkpoint, rename: Any
) -> tuple[list[tuple[str, Bounds]], int]:
    """What a rank holding ``model`` should read: each tensor's own region, each FP8 weight's whole scale
    (an FP8-resident layer's scale buffer is that scale, not a tensor read on its own); for a fused expert
    parameter stored per expert, the parts of the pieces its region overlaps (:func:`expert_piece_reads`).

    Returns the sorted reads and their byte count (region elements x on-disk item size).
    """
    from automodel_plugins.model.tensors import model_tensors

    reads: list[tuple[str, Bounds]] = []
    nbytes = 0
    from automodel_plugins.model.fp8_experts import Fp8Experts

    for name, tensor in model_tensors(model).items():
        if name.endswith("_scale_inv"):  # the scale buffers of FP8-resident layers and experts
            continue
        if name.rsplit(".experts.", 1)[-1] in _EXPERT_PIECES and rename(name) not in checkpoint:
            resident = isinstance(model.get_submodule(name.rpartition(".")[0]), Fp8Experts)
            pieces = expert_piece_reads(name, tensor, checkpoint, every_scale=resident)
            reads += pieces
            nbytes += sum(_read_bytes(checkpoint, key, bounds) for key, bounds in pieces)
            continue
        key = rename(name)
        info = checkpoint.info(key)
        bounds = chunk_bounds(tensor)
        elements = math.prod(hi - lo for lo, hi in bounds) if bounds else math.prod(info.shape)
        reads.append((key, bounds))
        nbytes += elements * info.dtype.itemsize
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        if info.dtype == torch.float8_e4m3fn:  # FP8 data, dequantized or kept FP8: its scale is read whole
            reads.append((scale_key, None))
            nbytes += checkpoint.info(scale_key).nbytes
    return sorted(reads, key=_read_order), nbytes


def _read_bytes(checkpoint: Checkpoint, key: str, bounds: Bounds) -> int:
    info = checkpoint.info(key)
    elements = math.prod(hi - lo for lo, hi in bounds) if bounds else math.prod(info.shape)
    return elements * info.dtype.itemsize


def _read_order(read: tuple[str, Bounds]) -> tuple[str, str]:
    return read[0], repr(read[1])


def sorted_reads(reads: list[tuple[str, Bounds]]) -> list[tuple[str, Bounds]]:
    return sorted(reads, key=_read_order)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_part(tensor: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that this rank's shard of ``tensor`` holds (by ``torch.chunk``'s rule), in the local
    tensor's order: ``Shard(d)`` chunks what the rank still holds along ``d``; ``_StridedShard(d, split_factor=s)``
    chunks it into ``s`` runs first and takes this rank's chunk of each (expert LoRA's ``lora_B`` under expert
    parallelism: columns ``k * E + e`` of the rank's experts ``e``)."""
    if not is_dtensor(tensor):
        return full
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    held = [torch.arange(size) for size in tensor.shape]
    coordinate = tensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        parts, index = tensor.device_mesh.size(mesh_dim), coordinate[mesh_dim]
        if isinstance(placement, _StridedShard):
            runs = torch.chunk(held[placement.dim], placement.split_factor)
            held[placement.dim] = torch.cat([_torch_chunk(run, parts, index) for run in runs])
        elif isinstance(placement, Shard):
            held[placement.dim] = _torch_chunk(held[placement.dim], parts, index)
    for dim, indices in enumerate(held):
        if indices.numel() != full.shape[dim] or not torch.equal(indices, torch.arange(full.shape[dim])):
            full = full.index_select(dim, indices)
    return full


def _torch_chunk(indices: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """``torch.chunk(indices, parts)[index]``, empty past the last chunk (DTensor's padding)."""
    chunks = torch.chunk(indices, parts)
    return chunks[index] if index < len(chunks) else indices[:0]


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: call on every rank)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def mismatches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in dtype, shape or any bit; names on one side only count too."""
    out = sorted(set(actual) ^ set(expected))
    for name in sorted(set(actual) & set(expected)):
        a, e = actual[name].detach(), expected[name].detach()
        if a.dtype != e.dtype or a.shape != e.shape or not torch.equal(a, e):
            out.append(name)
    return out


def local_mismatches(model: nn.Module, expected: dict[str, torch.Tensor]) -> list[str]:
    """Names whose local shard differs from the reference's same region (no communication)."""
    from automodel_plugins.model.tensors import model_tensors

    out = []
    for name, tensor in model_tensors(model).items():
        bounds = chunk_bounds(tensor)
        want = expected[name]
        if bounds is not None:
            want = want[tuple(slice(lo, hi) for lo, hi in bounds)]
        local = tensor.to_local() if is_dtensor(tensor) else tensor
        if local.dtype != want.dtype or local.shape != want.shape or not torch.equal(local.detach(), want):
            out.append(name)
    return out


def rotary_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rotary frequency buffer (non-persistent ``*inv_freq``), cloned."""
    from automodel_plugins.model.rotary import find_rotary_modules

    out = {}
    for name, module in find_rotary_modules(model):
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name.endswith("inv_freq"):
                out[f"{name}.{buffer_name}"] = buffer.detach().clone()
    return out


def garble_rotary(model: nn.Module) -> int:
    """Overwrite every rotary buffer with garbage, as ``to_empty`` leaves them; returns how many."""
    from automodel_plugins.model.rotary import find_rotary_modules

    count = 0
    with torch.no_grad():
        for _, module in find_rotary_modules(model):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer_name.endswith("inv_freq"):
                    buffer.fill_(1234.5)
                    count += 1
    return count
