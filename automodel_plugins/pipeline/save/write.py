"""Writing a save plan into a directory, from one process or from every rank of a sharded run.

1. **Who writes what.** Every rank says which box of each tensor it holds (one gather of small tuples). Each
   distinct box is written by the lowest rank holding it (a replica, a plain tensor: rank 0), and the boxes must
   tile each tensor exactly, or the save stops before anything is written (pipeline stages, a layout whose
   shard is not one box).
2. **Scales.** Each FP8 weight's amax over the boxes a rank writes (per tensor, or per block of the grid),
   combined over ranks by one all-reduce MAX of all of them, gives the same scales on every rank; the scale
   policy keeps the source scale where it still fits.
3. **Files.** Rank 0 creates every shard file (header written, size reserved), then each rank writes its boxes'
   bytes at their offsets, a bounded chunk at a time (each chunk written on a background thread while the next
   is made); rank 0 writes the scales and the tensors carried over from the source. Each step ends with every
   rank learning whether any rank failed.
"""

from __future__ import annotations

import errno as errno_codes
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from automodel_plugins.adapters.pieces import boxes_tile, volume
from automodel_plugins.checkpoint.shards import ShardPlan, plan_shards
from automodel_plugins.checkpoint.write_behind import WriteBehind
from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, tensor_bytes
from automodel_plugins.errors import SaveError, SaveWriteError
from automodel_plugins.fp8.amax import all_reduce_max, block_amax, tensor_amax
from automodel_plugins.fp8.encode import encode
from automodel_plugins.fp8.scale_policy import ScaleChoice, choose_scale
from automodel_plugins.fp8.scales import decode_scale
from automodel_plugins.fp8.stacked import stacked_block_amax, stacked_encode
from automodel_plugins.pipeline.save.values import CHUNK_ELEMENTS, Box, PieceValues, TensorValues
from automodel_plugins.progress import progress_bar

if TYPE_CHECKING:
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.save.collective import Ranks
    from automodel_plugins.pipeline.save.plan import PlannedWrite, SavePlan

__all__ = ["FILE_METADATA", "WriteResult", "check_tiling", "write_plan"]

FILE_METADATA = {"format": "pt"}


@dataclass
class WriteResult:
    """The files written, the tensor bytes this rank wrote, and the scale chosen for each FP8 weight."""

    shards: ShardPlan
    bytes_written: int = 0
    scales: dict[str, ScaleChoice] = field(default_factory=dict)


def write_plan(
    plan: SavePlan,
    values: TensorValues,
    directory: Path,
    *,
    ranks: Ranks,
    source: Checkpoint | None,
    max_shard_size: int,
    progress: bool | None,
    fsync: bool = True,
    label: str = "saving",
    native: bool = False,
) -> WriteResult:
    """Write every tensor of ``plan`` into shard files in ``directory`` (the index and config are the caller's;
    ``native``: the files named as Mistral's native ones).

    Every rank calls it; every collective is reached by every rank (a failure on one rank is first made known
    to all, then raised everywhere), so no rank is left waiting.
    """
    if any(planned.piece_of is not None for planned in plan.tensors):
        values = PieceValues(values, plan, ranks)
    writes = _assign_boxes(plan, values, ranks)
    scales = _choose_scales(plan, values, writes, source, ranks)
    shards = plan_shards(plan.specs(), max_shard_size, native=native)
    error: BaseException | None = None
    if ranks.is_main:
        try:
            _check_free_space(directory, shards)
            for name, specs in shards.files.items():
                SafetensorsWriter.create(directory / name, FileLayout.plan(specs, FILE_METADATA)).close(
                    sync=False
                )
        except OSError as exc:
            error = _write_error(exc, directory)
    ranks.agree(error, "creating the shard files")
    writers: dict[str, SafetensorsWriter] = {}
    try:
        for name, specs in shards.files.items():
            writers[name] = SafetensorsWriter.attach(directory / name, FileLayout.plan(specs, FILE_METADATA))
        by_key = {key: writers[file] for key, file in shards.weight_map.items()}
        items = progress_bar(
            list(zip(plan.tensors, writes, strict=True)),
            enabled=progress if ranks.is_main else False,
            desc=f"{label} {shards.total_size / 2**30:.2f} GiB",
        )
        with WriteBehind() as pending:
            for planned, box in items:
                if box is not None:
                    _write_values(planned, box, values, by_key[planned.key], scales.get(planned.key), pending)
                if ranks.is_main:
                    _write_small(planned, by_key, scales.get(planned.key), source, pending)
            pending.drain()
        for writer in writers.values():
            writer.close(sync=fsync)
    except OSError as exc:
        error = _write_error(exc, directory)
    except Exception as exc:
        error = exc
    finally:
        for writer in writers.values():
            writer.close(sync=False)
    bytes_written = sum(writer.bytes_written for writer in writers.values())
    ranks.agree(error, "writing the tensors")
    return WriteResult(shards, bytes_written, scales)


def _check_free_space(directory: Path, shards: ShardPlan) -> None:
    """Refuse up front a disk that cannot hold the checkpoint (rather than fill it and fail half way)."""
    needed = shards.total_size
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(
            errno_codes.ENOSPC,
            f"the checkpoint needs {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free",
        )


def _write_error(exc: OSError, directory: Path) -> SaveWriteError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno_codes.ENOSPC:
        reason = "the disk is full" + (f" ({exc.strerror})" if exc.strerror and "GiB" in exc.strerror else "")
    error = SaveWriteError(f"writing the checkpoint failed: {reason}", path=directory, errno=exc.errno)
    error.__cause__ = exc
    return error


# --- 1. who writes what -------------------------------------------------------------------------------------


def _assign_boxes(plan: SavePlan, values: TensorValues, ranks: Ranks) -> list[Box | None]:
    """This rank's box of each planned tensor if it is the one to write it, else None."""
    mine = [values.box(planned.name) for planned in plan.tensors]
    everyone = ranks.gather(mine)
    writes: list[Box | None] = []
    for index, planned in enumerate(plan.tensors):
        writer_of: dict[Box, int] = {}
        for rank, boxes in enumerate(everyone):
            box = boxes[index]
            if volume(box) and box not in writer_of:
                writer_of[box] = rank
        check_tiling(planned, list(writer_of))
        own = mine[index]
        writes.append(own if writer_of.get(own) == ranks.rank else None)
    return writes


def check_tiling(planned: PlannedWrite, boxes: Sequence[Box]) -> None:
    """The distinct boxes the ranks hold must cover the tensor exactly once."""
    if not boxes_tile(planned.shape, boxes):
        shown = sorted(boxes)[:8]
        raise SaveError(
            f"the ranks together do not hold tensor {planned.name!r} (shape {planned.shape}) exactly once: "
            f"their regions are {shown}{' ...' if len(boxes) > 8 else ''}. Every rank must call save_pretrained on "
            "the whole model (pipeline stages cannot be saved this way), with shards that are each one region "
            "of a tensor"
        )


# --- 2. scales ----------------------------------------------------------------------------------------------


def _choose_scales(
    plan: SavePlan, values: TensorValues, writes: list[Box | None], source: Checkpoint | None, ranks: Ranks
) -> dict[str, ScaleChoice]:
    """Every FP8 weight's scale, from the global amax (one all-reduce for all of them) and the policy."""
    quantized = [(i, planned) for i, planned in enumerate(plan.tensors) if planned.scale is not None]
    if not quantized:
        return {}
    error: BaseException | None = None
    local = torch.zeros(sum(math.prod(planned.scale.shape) for _, planned in quantized), dtype=torch.float32)
    try:
        offset = 0
        for i, planned in quantized:
            size = math.prod(planned.scale.shape)
            local[offset : offset + size] = _local_amax(planned, writes[i], values).reshape(-1)
            offset += size
    except Exception as exc:
        error = exc
    ranks.agree(error, "measuring the weights' amax")
    combined = all_reduce_max(local.to(values.device)).cpu()
    choices: dict[str, ScaleChoice] = {}
    offset = 0
    try:
        for _, planned in quantized:
            shape = planned.scale.shape
            amax = combined[offset : offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
            if not bool(torch.isfinite(amax).all()):
                raise SaveError(
                    f"tensor {planned.name!r} holds NaN or inf values: it cannot be stored as FP8"
                )
            source_scale = None
            if planned.scale.source_key is not None and source is not None:
                source_scale = source.read(planned.scale.source_key)
                if planned.scale.source_index is not None:
                    source_scale = source_scale[planned.scale.source_index]
                source_scale = source_scale.reshape(shape)
            choices[planned.key] = choose_scale(
                amax, source=source_scale, scale_dtype=planned.scale.dtype, fp8_dtype=planned.dtype
            )
    except Exception as exc:
        error = exc
    ranks.agree(error, "choosing the FP8 scales")
    return choices


def _local_amax(planned: PlannedWrite, box: Box | None, values: TensorValues) -> torch.Tensor:
    """The amax over the box this rank writes, in the scale's shape (zeros when it writes none)."""
    block, grid = planned.scale.block_size, planned.scale.shape
    amax = torch.zeros(grid, dtype=torch.float32)
    if box is None:
        return amax
    for row, chunk in values.chunks(planned.name, 0):
        if block is None:
            part = tensor_amax(chunk)
        elif len(grid) > 2:  # one grid per matrix of a stacked weight
            part = stacked_block_amax(chunk, block, grid, origin=(box[0][0] + row, *(b[0] for b in box[1:])))
        else:
            part = block_amax(chunk, block, grid, origin=(box[0][0] + row, box[1][0]))
        amax = torch.maximum(amax, part.cpu())
    return amax


# --- 3. bytes -----------------------------------------------------------------------------------------------


def _write_values(
    planned: PlannedWrite,
    box: Box,
    values: TensorValues,
    writer: SafetensorsWriter,
    scale: ScaleChoice | None,
    pending: WriteBehind,
) -> None:
    """This rank's box of ``planned``, chunk by chunk: as held, cast, or encoded as FP8 with its chosen scale,
    each chunk written while the next is made."""
    decoded = None if scale is None else decode_scale(scale.stored)
    for row, chunk in values.chunks(planned.name, _chunk_elements(planned, values)):
        if not box:  # a 0-d tensor
            region = None
        else:
            region = (
                slice(box[0][0] + row, box[0][0] + row + chunk.shape[0]),
                *(slice(a, b) for a, b in box[1:]),
            )
        if decoded is not None and len(planned.scale.shape) > 2:  # one grid per matrix of a stacked weight
            origin = (box[0][0] + row, *(b[0] for b in box[1:]))
            data = stacked_encode(
                chunk,
                decoded.to(chunk.device),
                fp8_dtype=planned.dtype,
                block_size=planned.scale.block_size,
                origin=origin,
            )
        elif decoded is not None:
            origin = (box[0][0] + row, box[1][0]) if planned.scale.block_size else (0, 0)
            block = planned.scale.block_size
            data = encode(
                chunk, decoded.to(chunk.device), fp8_dtype=planned.dtype, block_size=block, origin=origin
            )
        else:
            data = chunk if chunk.dtype == planned.dtype else chunk.to(planned.dtype)
        pending.write(writer, planned.key, tensor_bytes(data.cpu()), region)


def _chunk_elements(planned: PlannedWrite, values: TensorValues) -> int:
    """Chunk size for ``planned``: whole when written as held from CPU memory (views cost nothing), larger when
    the only new memory is the FP8 output (per-tensor encoding through the table), else the default."""
    dtype = values.dtype(planned.name)
    if values.device.type != "cpu":
        return CHUNK_ELEMENTS  # each chunk is copied to the host: keep that copy bounded
    if planned.scale is None and dtype == planned.dtype:
        return 0
    if planned.scale is not None and planned.scale.block_size is None and dtype.itemsize == 2:
        return 4 * CHUNK_ELEMENTS
    return CHUNK_ELEMENTS


def _write_small(
    planned: PlannedWrite,
    writers: dict[str, SafetensorsWriter],
    scale: ScaleChoice | None,
    source: Checkpoint | None,
    pending: WriteBehind,
) -> None:
    """Rank 0's part beyond the boxes: the FP8 scale, and the source tensors carried over unchanged."""
    if scale is not None:
        pending.write(writers[planned.scale.key], planned.scale.key, tensor_bytes(scale.stored.cpu()))
    for spec in planned.carried:
        if source is None:
            raise SaveError(f"tensor {spec.name!r} is to be carried over from the source, which is not open")
        pending.write(writers[spec.name], spec.name, tensor_bytes(source.read(spec.name)))
