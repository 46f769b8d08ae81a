"""Reading a checkpoint tensor as the model's value: what both the load (``load.stream``) and the save
(``save.values``: a checkpoint converted as a load would read it) use, so they never disagree.

* :func:`read_value`: one tensor (or one rank's region of it) in the model's dtype, FP8 data dequantized with
  its validated scale (:func:`read_scale`), a narrowing float cast refused when it overflows;
* :func:`read_assembled`: a model tensor put together from its pieces, one piece in memory at a time;
* :func:`read_fp8`: an FP8 weight's stored codes and its scale, kept FP8;
* :func:`activation_scale_key` / :func:`read_activation_scale`: its static activation scale, which an
  FP8-resident module keeps beside them;
* :func:`action_for` / :func:`loaded_dtype`: how a stored tensor becomes the model's value (:data:`Action`).
"""

from __future__ import annotations

from typing import Literal

import torch

from automodel_plugins.adapters import TensorSource
from automodel_plugins.adapters.pieces import PieceGeometry, as_slices, intersect, relative_slices, whole_box
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import NonFiniteWeightError, ScaleError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.formats import ACTIVATION_SCALE_SUFFIXES, is_fp8
from automodel_plugins.fp8.scales import decode_activation_scale, validate_scale
from automodel_plugins.fp8.stacked import (
    check_stacked_scale_shape,
    is_stacked,
    stacked_dequantize,
    validate_stacked_scale,
)
from automodel_plugins.model.placement import Region

__all__ = [
    "Action",
    "action_for",
    "activation_scale_key",
    "loaded_dtype",
    "read_activation_scale",
    "read_assembled",
    "read_fp8",
    "read_scale",
    "read_value",
]

Action = Literal["dequantized", "kept_fp8", "converted", "used_in_place"]
"""How a tensor's value is made: FP8 data times its scale; FP8 data and its scale kept as they are (an
FP8-resident linear weight); a cast (or a copy assembled from pieces); or the stored tensor as it is."""


def loaded_dtype(
    stored: torch.dtype, *, fp8: bool, dtype: torch.dtype, keep_fp8: bool = False
) -> torch.dtype:
    """What a model holds for a stored tensor: floats (FP8 data included) become ``dtype``, others stay;
    FP8 data kept resident stays in its FP8 dtype."""
    if fp8 and keep_fp8:
        return stored
    return dtype if fp8 or stored.is_floating_point else stored


def action_for(stored: torch.dtype, *, fp8: bool, dtype: torch.dtype, keep_fp8: bool = False) -> Action:
    """How a stored tensor becomes the model's value in ``dtype`` (see :data:`Action`)."""
    if fp8:
        return "kept_fp8" if keep_fp8 else "dequantized"
    return "used_in_place" if stored == loaded_dtype(stored, fp8=False, dtype=dtype) else "converted"


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
        stacked = is_stacked(tuple(info.shape), source.block_size)
        matrices = _leading_run(region, info.shape[0]) if stacked and len(info.shape) == 3 else None
        scale = read_scale(checkpoint, source, matrices)
        data = checkpoint.read(source.key, region).to(device)
        block_region = None if region is None or source.block_size is None else region
        if matrices is not None and block_region is not None:  # the grids of those matrices only were read
            block_region = (slice(0, matrices[1] - matrices[0]), *block_region[1:])
        decode = stacked_dequantize if stacked else dequantize
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


def _leading_run(region: Region | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` along dim 0 of ``region`` of a stacked weight of ``size`` matrices, when it is fewer
    than all of them (then only their grids are read: a piece of one expert reads one expert's grid)."""
    if not region:
        return None
    start, stop, _ = region[0].indices(size)
    return None if (start, stop) == (0, size) else (start, max(start, stop))


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


def read_scale(
    checkpoint: Checkpoint, source: TensorSource, matrices: tuple[int, int] | None = None
) -> torch.Tensor:
    """The whole scale of an FP8 tensor as stored, refused unless finite, positive and the right shape; with
    ``matrices`` (``start, stop`` along the leading dim of a 3-D stacked weight: experts), only those matrices'
    grids, each refused as it would be in the whole."""
    weight_shape = tuple(checkpoint.info(source.key).shape)
    if matrices is not None and len(weight_shape) == 3 and is_stacked(weight_shape, source.block_size):
        info = checkpoint.info(source.scale_key)
        check_stacked_scale_shape(
            tuple(info.shape), weight_shape, source.block_size, source.scale_key, info.file
        )
        scale = checkpoint.read(source.scale_key, (slice(*matrices),))
        for grid in scale:
            validate_scale(
                grid,
                weight_shape=weight_shape[1:],
                block_size=source.block_size,
                key=source.scale_key,
                path=info.file,
            )
        return scale
    scale = checkpoint.read(source.scale_key)
    check = validate_stacked_scale if is_stacked(weight_shape, source.block_size) else validate_scale
    check(
        scale,
        weight_shape=weight_shape,
        block_size=source.block_size,
        key=source.scale_key,
        path=checkpoint.info(source.scale_key).file,
    )
    return scale


def activation_scale_key(source: TensorSource) -> str | None:
    """The static activation scale stored beside an FP8 tensor stored as one piece (one of its ``dropped_keys``;
    the piece may be stored with its rows reordered: a per-tensor scale does not mind), None when there is none or
    the tensor is assembled from several pieces (each piece's would be a scale of its own: a resident load
    dequantizes such experts, ``pipeline.load.resident``); two spellings beside one tensor are refused (which
    one applies would be a guess)."""
    parts = source.parts()
    if len(parts) != 1:
        return None
    keys = [key for key in parts[0].dropped_keys if key.endswith(ACTIVATION_SCALE_SUFFIXES)]
    if len(keys) > 1:
        raise ScaleError(
            f"FP8 tensor has several static activation scales ({', '.join(keys[:4])}): which one applies is "
            "ambiguous",
            key=source.key,
        )
    return keys[0] if keys else None


def read_activation_scale(checkpoint: Checkpoint, key: str, count: int) -> torch.Tensor:
    """The static activation scale ``key`` as an FP8-resident module holds it (fp32, ``count`` finite positive
    values: 0-d for one, ``[count]`` for experts)."""
    return decode_activation_scale(checkpoint.read(key), count, key=key, path=checkpoint.info(key).file)


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
    if source.is_assembled:
        return _read_fp8_rotary(checkpoint, source, device=device, region=region)
    scale = read_scale(checkpoint, source)
    if in_place_ok and region is None and device.type == "cpu":
        return checkpoint.tensor(source.key), scale
    return checkpoint.read(source.key, region).to(device), scale


def _read_fp8_rotary(
    checkpoint: Checkpoint, source: TensorSource, *, device: torch.device, region: Region | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of a weight stored as one FP8 piece with its rows in Mistral's rotary order (a native q/k),
    permuted into the model's row order (``region``'s rows of it: a head's rows are read whole), and its scale
    as stored: planning kept it FP8 only where the permutation keeps every row in its row of scale blocks
    (``plan.residency_misfit``), so each code keeps its scale."""
    (piece,) = source.parts()
    info = checkpoint.info(piece.key)
    shape = tuple(info.shape)
    geometry = PieceGeometry.of(piece, shape, len(shape))
    overlap = whole_box(shape) if region is None else tuple((s.start, s.stop) for s in region)
    stored_region = geometry.stored_region(overlap)
    data = checkpoint.read(piece.key, None if stored_region == whole_box(shape) else as_slices(stored_region))
    codes = geometry.to_model(data.view(torch.uint8), overlap).contiguous().view(info.dtype)
    return codes.to(device), read_scale(checkpoint, piece.stored_source())
