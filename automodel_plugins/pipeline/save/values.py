"""Where the values a save writes come from, a bounded chunk at a time: a model's tensors, or a checkpoint.

* :class:`ModelValues`: the tensors of a model in memory. A DTensor (FSDP2, tensor parallel) gives this rank's
  local shard, which is one box of the global tensor (``model.placement.local_region``); a plain tensor the
  whole of it. The weight of an FP8-resident layer is valued as what it stands for, its dequantized weight
  in the compute dtype, a chunk of rows at a time (re-encoding it with its own scale gives back its bytes);
  a fused tensor of FP8-resident experts likewise, a run of experts at a time, each matrix with its own grid.
* :class:`CheckpointValues`: a checkpoint read as a load would read it (``pipeline.readers.read_value``: FP8
  dequantized with its scale, other floats cast), a chunk of rows at a time, never a whole tensor: what
  ``automodel-plugins convert`` streams through.

Both hand out chunks of at most about :data:`CHUNK_ELEMENTS` elements (whole rows of the box), so the
working set of a save stays a few MiB whatever the tensor sizes. :class:`PieceValues` puts either in front of
a plan that writes model tensors back as the pieces they were assembled from: a piece's values are the part
of its model tensor's box this process holds, in the piece's stored orientation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import torch

from automodel_plugins.adapters.pieces import intersect, relative_slices
from automodel_plugins.errors import SaveError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.placement import is_dtensor, local_region
from automodel_plugins.pipeline.readers import read_value

if TYPE_CHECKING:
    from automodel_plugins.adapters.pieces import PieceGeometry
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.model.fp8_linear import Fp8Linear
    from automodel_plugins.pipeline.load.plan import LoadPlan
    from automodel_plugins.pipeline.save.collective import Ranks
    from automodel_plugins.pipeline.save.plan import SavePlan

__all__ = ["CHUNK_ELEMENTS", "Box", "CheckpointValues", "ModelValues", "PieceValues", "TensorValues"]

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk (4 MiB of fp32 temporaries)."""

Box = tuple[tuple[int, int], ...]
"""A region of a tensor as ``(start, stop)`` per dim: plain data, to compare and send between ranks."""


class TensorValues(Protocol):
    """The values of the tensors being saved, as this process holds them."""

    device: torch.device

    def box(self, name: str) -> Box:
        """The region of tensor ``name`` this process holds (empty along some dim when it holds none)."""

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the values of ``name`` come in."""

    def chunks(
        self, name: str, elements: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row within the box, values)`` for consecutive chunks of whole rows of the box, of about
        ``elements`` elements each (default :data:`CHUNK_ELEMENTS`; ``0``: as large as costs no memory);
        ``rows``: only the box's rows ``[start, stop)`` (default all)."""


def _rows_per_chunk(shape: tuple[int, ...], elements: int | None) -> int:
    return max(1, (elements or CHUNK_ELEMENTS) // max(1, math.prod(shape[1:])))


class ModelValues:
    """The tensors of a model (name -> tensor), each as this rank holds it; ``resident`` names the weights of
    FP8-resident layers (``hf_layout.resident_modules``), valued by their dequantized rows."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        resident: Mapping[str, Fp8Linear | Fp8Experts] = {},
    ) -> None:
        self.tensors = dict(tensors)
        self.resident = dict(resident)
        self.whole_scales: dict[str, torch.Tensor] = {}
        """Grids gathered whole, by weight name: those of experts split by expert tensor parallelism."""
        first = next(iter(self.tensors.values()), None)
        self.device = torch.device("cpu") if first is None else _local(first).device
        self._regroup_expert_slices()

    def _regroup_expert_slices(self) -> None:
        """Every rank, in the same order: experts split by expert tensor parallelism
        (:mod:`~automodel_plugins.model.expert_tensor_parallel`) hold, of ``gate_up_proj``, rows of both halves
        (two boxes), and their grids split with the codes. For the save each ``gate_up_proj`` is re-split into
        one box a rank (``Shard(1)``: gate rows on one rank, up rows on the other, one fused tensor whole at a
        time in passing) and the grids (4 bytes a block) are gathered whole, so the box-at-a-time writer and the
        experts' dequantization take them as they take any split tensor."""
        from automodel_plugins.model.expert_tensor_parallel import EXPERT_TP_MESH

        for name, tensor in list(self.tensors.items()):
            layer = self.resident.get(name)
            if isinstance(layer, Fp8Experts) and getattr(layer, EXPERT_TP_MESH, None) is not None:
                grid = layer.scale(name.rpartition(".")[2])
                self.whole_scales[name] = grid.full_tensor() if is_dtensor(grid) else grid  # type: ignore[attr-defined]
            if _strided_past_dim0(tensor):  # dequantized experts' too
                self.tensors[name] = _one_box_a_rank(tensor, dim=1)

    def gather_whole(self, name: str) -> None:
        """Hold tensor ``name`` whole from now on: a DTensor's ``full_tensor()`` (a collective every rank of its
        mesh calls, in the same order); a plain tensor already is."""
        tensor = self.tensors[name]
        if name in self.resident:
            raise SaveError(f"{name!r} is FP8-resident and cut inside a rotary head: it cannot be gathered")
        if is_dtensor(tensor):
            self.tensors[name] = tensor.full_tensor()  # type: ignore[attr-defined]

    def dtype(self, name: str) -> torch.dtype:
        layer = self.resident.get(name)
        return layer.compute_dtype if layer is not None else self.tensors[name].dtype

    def box(self, name: str) -> Box:
        tensor = self.tensors[name]
        region = local_region(tensor)
        if region is None:
            return tuple((0, size) for size in tensor.shape)
        return tuple((part.start, part.stop) for part in region)

    def chunks(
        self, name: str, elements: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Views of the local tensor: ``elements=0`` gives it whole (one write, no copy)."""
        if name in self.resident:
            yield from _rows_of(self._dequantized_chunks(name, elements, rows), rows)
            return
        local = _local(self.tensors[name]).detach()
        if local.dim() == 0 or (elements == 0 and rows is None and local.is_contiguous()):
            yield 0, local
            return
        start, stop = rows if rows is not None else (0, local.shape[0])
        step = _rows_per_chunk(tuple(local.shape), elements)
        for row in range(start, stop, step):
            yield row, local[row : min(row + step, stop)]

    def _dequantized_chunks(
        self, name: str, elements: int | None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows of this rank's box of an FP8-resident weight, dequantized as the layer's forward does (fp32
        product with the block of each element, one rounding to the compute dtype); of fused experts, only
        the experts ``rows`` names (one piece's expert is not all of them)."""
        layer = self.resident[name]
        codes = _local(self.tensors[name]).detach().view(layer.fp8_dtype)
        if isinstance(layer, Fp8Experts):
            scale = self.whole_scales.get(name)
            if scale is None:
                scale = layer.scale(name.rpartition(".")[2])
            held = local_region(scale)  # expert parallelism: the grids of this rank's experts only
            box = self.box(name)
            first, last = rows if rows is not None else (0, codes.shape[0])
            box = ((box[0][0] + first, box[0][0] + last), *box[1:])
            matrix = tuple(self.tensors[name].shape[1:])
            for row, chunk in _dequantized_experts(
                codes[first:last],
                _local(scale),
                layer,
                box,
                elements,
                0 if held is None else held[0].start,
                matrix=matrix,
            ):
                yield first + row, chunk
            return
        (row0, _), (col0, col1) = self.box(name)
        step = _rows_per_chunk(tuple(codes.shape), elements or None)
        for row in range(0, codes.shape[0], step):
            part = codes[row : row + step]
            region = (slice(row0 + row, row0 + row + part.shape[0]), slice(col0, col1))
            yield (
                row,
                dequantize(
                    part.contiguous(),
                    _local(layer.weight_scale_inv),  # tensor parallelism replicates it: the whole grid
                    dtype=layer.compute_dtype,
                    block_size=layer.block_size,
                    region=region if layer.block_size is not None else None,
                ),
            )


def _dequantized_experts(
    codes: torch.Tensor,
    scale: torch.Tensor,
    layer: Fp8Experts,
    box: Box,
    elements: int | None,
    scale_first: int = 0,
    *,
    matrix: tuple[int, ...] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Runs of experts of this rank's box of a fused FP8-resident tensor, each matrix dequantized with its own
    grid of the stacked ``scale`` (whole, or from expert ``scale_first`` on) as the experts' forward does."""
    (expert0, _), (row0, row1), (col0, col1) = box
    # whole: the box is each expert's whole matrix (``matrix``: its global shape; a column split from 0 is not)
    whole = (row0, col0) == (0, 0) and (row1, col1) == (matrix or tuple(codes.shape[1:]))
    region = None if whole else (slice(row0, row1), slice(col0, col1))
    step = _rows_per_chunk(tuple(codes.shape), elements or None)
    for first in range(0, codes.shape[0], step):
        part = codes[first : first + step]
        out = torch.empty(part.shape, dtype=layer.compute_dtype, device=part.device)
        for index in range(part.shape[0]):
            out[index] = dequantize(
                part[index].contiguous(),
                scale[expert0 - scale_first + first + index],
                dtype=layer.compute_dtype,
                block_size=layer.block_size,
                region=region,
            )
        yield first, out


def _rows_of(
    chunks: Iterator[tuple[int, torch.Tensor]], rows: tuple[int, int] | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """The part of ``chunks`` within rows ``[start, stop)`` (all of them for ``None``)."""
    for row, chunk in chunks:
        if rows is None:
            yield row, chunk
            continue
        first, last = max(row, rows[0]), min(row + chunk.shape[0], rows[1])
        if first < last:
            yield first, chunk[first - row : last - row]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _strided_past_dim0(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor placed ``_StridedShard`` on a dim past 0 (expert tensor parallelism's
    ``gate_up_proj``: several boxes a rank). Told by placement, so every rank decides alike (a collective
    follows)."""
    if not is_dtensor(tensor):
        return False
    return any(
        type(p).__name__ in ("_StridedShard", "StridedShard") and p.dim % tensor.dim() != 0  # type: ignore[attr-defined]
        for p in tensor.placements  # type: ignore[attr-defined]
    )


def _one_box_a_rank(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` (a DTensor on a 1-D mesh) re-split ``Shard(dim)``, whole on every rank in passing."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    whole = tensor.full_tensor()  # type: ignore[attr-defined]
    index = mesh.get_local_rank()
    local = whole.tensor_split(mesh.size(), dim=dim)[index].clone()  # torch.chunk's split where it divides
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=whole.shape, stride=whole.stride()
    )


class CheckpointValues:
    """The model values a load of ``checkpoint`` with ``plan`` would give, read a chunk of rows at a time."""

    def __init__(self, checkpoint: Checkpoint, plan: LoadPlan) -> None:
        self.checkpoint = checkpoint
        self.plan = plan
        self.device = torch.device("cpu")

    def dtype(self, name: str) -> torch.dtype:
        return self.plan[name].dtype

    def box(self, name: str) -> Box:
        return tuple((0, size) for size in self.plan[name].shape)

    def chunks(
        self, name: str, elements: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Reads into fresh buffers: never more than about ``elements`` (``0`` and ``None``: the default)."""
        planned = self.plan[name]
        shape = planned.shape
        if not shape:
            value, _ = read_value(self.checkpoint, planned.source, dtype=planned.dtype, device=self.device)
            yield 0, value
            return
        start, stop = rows if rows is not None else (0, shape[0])
        step = _rows_per_chunk(shape, elements)
        for row in range(start, stop, step):
            region = tuple(slice(0, size) for size in shape)
            region = (slice(row, min(row + step, stop)), *region[1:])
            value, _ = read_value(
                self.checkpoint,
                planned.source,
                dtype=planned.dtype,
                device=self.device,
                region=region,
                shape=shape,
            )
            yield row, value

    def values_of(self, name: str, box: Box) -> torch.Tensor:
        """Only ``box`` of tensor ``name``, read as a load would read it: the bytes of that box and nothing
        else (a piece of one expert's gate rows reads those rows, not the expert's whole matrix)."""
        planned = self.plan[name]
        value, _ = read_value(
            self.checkpoint,
            planned.source,
            dtype=planned.dtype,
            device=self.device,
            region=tuple(slice(start, stop) for start, stop in box),
            shape=planned.shape,
        )
        return value


class PieceValues:
    """The values of a plan's pieces (entries with ``piece_of``) from ``base``, which holds the model tensors;
    every other name goes to ``base`` as it is.

    A piece's box is the overlap of its geometry's box with the box of the model tensor ``base`` holds, in the
    piece's stored coordinates; its chunks are that overlap's values, reoriented, a bounded run of stored rows
    at a time (the whole overlap is gathered first only where stored rows are not model rows, a piece of one
    expert or a transposed matrix: at most one piece; from a base with ``values_of``, a checkpoint, that box is
    read alone: an expert's gate rows never read its up rows).
    """

    def __init__(self, base: TensorValues, plan: SavePlan, ranks: Ranks | None = None) -> None:
        self.base = base
        self.device = base.device
        self.pieces = {
            planned.name: (planned.piece_of, planned.geometry)
            for planned in plan.tensors
            if planned.piece_of is not None and planned.geometry is not None
        }
        if ranks is not None and ranks.distributed:
            self._gather_cut_heads(ranks)

    def _gather_cut_heads(self, ranks: Ranks) -> None:
        """Every rank: the model tensors of rotary-order pieces whose rows some rank holds only part of a head
        of (a shard boundary inside a head) are gathered whole on every rank (``TensorValues.gather_whole``,
        a collective), so rank 0 writes them; whole heads stay with the rank holding them."""
        if not any(geometry.rope_heads is not None for _, geometry in self.pieces.values()):
            return
        cut = set()
        for name, (tensor, geometry) in self.pieces.items():
            overlap = self._overlap(name)[3]
            if (
                geometry.rope_heads is not None
                and overlap is not None
                and geometry.whole_heads(overlap) is None
            ):
                cut.add(tensor)
        everyone = sorted(set().union(*ranks.gather(sorted(cut))))
        gather = getattr(self.base, "gather_whole", None)
        for tensor in everyone:
            if gather is None:
                raise SaveError(
                    f"{tensor!r} is held in parts that cut its rotary heads, and cannot be gathered"
                )
            gather(tensor)

    def dtype(self, name: str) -> torch.dtype:
        entry = self.pieces.get(name)
        return self.base.dtype(name if entry is None else entry[0])

    def _overlap(self, name: str) -> tuple[str, PieceGeometry, Box, Box | None]:
        tensor, geometry = self.pieces[name]
        held = self.base.box(tensor)
        return tensor, geometry, held, intersect(held, geometry.box)

    def box(self, name: str) -> Box:
        if name not in self.pieces:
            return self.base.box(name)
        _, geometry, _, overlap = self._overlap(name)
        if overlap is None:
            return tuple((0, 0) for _ in range(geometry.stored_ndim))
        region = geometry.stored_region(overlap)
        heads = geometry.whole_heads(overlap)
        if heads is not None and not geometry.transposed:  # whole heads: their own stored rows
            region = (heads, *region[1:])
        return region

    def chunks(
        self, name: str, elements: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        if name not in self.pieces:
            yield from self.base.chunks(name, elements, rows)
            return
        if rows is not None:
            raise SaveError(f"rows of the piece {name!r} are not asked for by the writer")
        tensor, geometry, held, overlap = self._overlap(name)
        if overlap is None:
            return
        first = geometry.stored_region(overlap)[0][0] if geometry.stored_ndim else 0
        own_rows = (overlap[0][0] - held[0][0], overlap[0][1] - held[0][0])  # only the rows the piece has
        if geometry.keeps_rows:
            for row, chunk in self.base.chunks(tensor, elements, own_rows):
                rows = ((held[0][0] + row, held[0][0] + row + chunk.shape[0]), *held[1:])
                part = intersect(rows, overlap)
                if part is not None:
                    values = geometry.to_stored(chunk[relative_slices(part, rows)])
                    yield geometry.stored_region(part)[0][0] - first, values.contiguous()
            return
        heads = geometry.whole_heads(overlap)
        if geometry.rope_heads is not None and (heads is None or geometry.transposed):
            raise SaveError(
                f"{name!r} is stored with its rows in Mistral's rotary order, and this process holds rows "
                f"{overlap[geometry.squeezed]} of {geometry.box[geometry.squeezed]}, which cut a head: its rows "
                "are permuted within the head, so it is written by a process holding whole heads"
            )
        values_of = getattr(self.base, "values_of", None)  # a reader: only the piece's own box is read
        if values_of is not None:
            gathered = values_of(tensor, overlap)
        else:
            parts = [
                chunk[relative_slices(part, rows)]
                for row, chunk in self.base.chunks(tensor, 0, own_rows)
                for rows in [((held[0][0] + row, held[0][0] + row + chunk.shape[0]), *held[1:])]
                for part in [intersect(rows, overlap)]
                if part is not None
            ]
            gathered = parts[0] if len(parts) == 1 else torch.cat(parts)  # one expert's run: no copy
        stored = geometry.to_stored(gathered) if heads is None else geometry.heads_to_stored(gathered)
        step = _rows_per_chunk(tuple(stored.shape), elements or None)
        for row in range(0, stored.shape[0], step):
            yield row, stored[row : row + step].contiguous()
