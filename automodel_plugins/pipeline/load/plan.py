"""The load plan: for every model tensor, where its value is in the checkpoint and what becomes of it.

Planning reads headers only. It asks the adapter where each tensor lives, accounts for every checkpoint key
(missing keys always fail; unused keys fail unless a pipeline stage expects them), checks what the headers can
tell (shapes, dtypes, each FP8 weight's scale dtype and grid shape, an FP8 scale beside a weight that is not
FP8), and decides once, for ``inspect`` and the streaming loader alike, the dtype each tensor loads in and how
it gets there: FP8 data is dequantized, or kept FP8 (``dequantize=False``: the FP8 weights of the tensors the
caller names as residency candidates), a float in another dtype is converted, anything else is used as stored.

A tensor assembled from pieces is planned piece by piece: every piece's key (and scale) must be in the
checkpoint, each stored tensor must have the shape its box needs and a dtype that can become the model's, each
FP8 piece's scale header must fit it, and the boxes must tile the tensor exactly once. It is ``dequantized``
when FP8 pieces are among them, else ``converted`` (copied into place), never used in place. A fused MoE expert
tensor (3-D) named a residency candidate is kept FP8 (codes and one stacked block grid) when it fits
:func:`residency_misfit`; when it does not, the plan's ``note`` says why it is dequantized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, filterfalse, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import TYPE_CHECKING

import torch

from automodel_plugins.adapters.base import key_view
from automodel_plugins.adapters.pieces import PieceGeometry, boxes_tile, whole_box
from automodel_plugins.errors import (
    AutomodelPluginsError,
    CheckpointError,
    DtypeMismatchError,
    MissingKeysError,
    ScaleError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from automodel_plugins.fp8.formats import is_fp8, weight_key_of_scale
from automodel_plugins.fp8.scales import check_scale_header, grid_shape
from automodel_plugins.fp8.stacked import check_stacked_scale_header, is_stacked, stacked_grid_shape
from automodel_plugins.pipeline.readers import Action, action_for, activation_scale_key, loaded_dtype

if TYPE_CHECKING:
    from automodel_plugins.adapters import Box, Piece, StateDictAdapter, TensorSource
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.checkpoint.header import TensorInfo

_KEY, _SCALE_KEY, _BOX = attrgetter("key"), attrgetter("scale_key"), attrgetter("box")
_DROPPED, _BLOCK, _TRANSPOSED = attrgetter("dropped_keys"), attrgetter("block_size"), attrgetter("transposed")
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")

__all__ = [
    "LoadPlan",
    "PlannedTensor",
    "plan_load",
    "residency_misfit",
]


@dataclass(frozen=True)
class PlannedTensor:
    """One model tensor of the plan: its checkpoint source, the dtype it loads in, and how."""

    source: TensorSource
    dtype: torch.dtype
    action: Action
    numel: int = 0
    scale_numel: int = 0
    shape: tuple[int, ...] = ()
    note: str = ""
    """For a residency candidate's FP8 data planned ``dequantized``: why it cannot stay FP8."""

    @property
    def is_fp8(self) -> bool:
        return self.source.is_fp8

    @property
    def pieces(self) -> int:
        """Checkpoint tensors the value is assembled from (0: one stored tensor, used as it is stored)."""
        return len(self.source.pieces)

    @property
    def resident_bytes(self) -> int:
        """Bytes the model holds for this tensor once loaded: FP8 codes plus their fp32 scale (and static
        activation scale) when kept FP8."""
        return self.numel * self.dtype.itemsize + (self.scale_numel * 4 if self.action == "kept_fp8" else 0)


@dataclass
class LoadPlan(Mapping[str, PlannedTensor]):
    """Model tensor name -> :class:`PlannedTensor`, in checkpoint order, and the keys left unread."""

    tensors: dict[str, PlannedTensor]
    unused_keys: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> PlannedTensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def consumed_keys(self) -> set[str]:
        """Every checkpoint key some model tensor accounts for (data, scales, dropped keys: each piece's
        :attr:`~automodel_plugins.adapters.base.Piece.keys`, gathered in C-level passes)."""
        parts = list(chain.from_iterable(planned.source.parts() for planned in self.tensors.values()))
        return {
            *map(_KEY, parts),
            *filter(None, map(_SCALE_KEY, parts)),
            *chain.from_iterable(map(_DROPPED, parts)),
        }

    def read_keys(self) -> set[str]:
        """The checkpoint keys a load reads: each tensor's (or piece's) data and its scale (dropped keys are
        not read)."""
        return {
            key
            for planned in self.tensors.values()
            for piece in planned.source.parts()
            for key in (piece.key, piece.scale_key)
            if key is not None
        }


def plan_load(
    tensors: Mapping[str, torch.Tensor],
    adapter: StateDictAdapter,
    checkpoint: Checkpoint,
    *,
    dtype: torch.dtype | None = None,
    allow_unused: bool = False,
    keep_fp8: Collection[str] = (),
    require_fp8: Collection[str] = (),
    sources: Mapping[str, TensorSource] | None = None,
    checked: set[str] | None = None,
) -> LoadPlan:
    """Plan the load of ``tensors`` (name -> the model's tensor, on meta or real) from ``checkpoint``.

    Floats load in ``dtype`` when given, else in each model tensor's own dtype. Tensors named in ``keep_fp8``
    whose checkpoint data is FP8 are planned ``kept_fp8`` (their FP8 data and scale are read as stored); those
    in ``require_fp8`` (the weights of layers already FP8-resident) must be FP8 in the checkpoint. Raises
    :class:`MissingKeysError`, :class:`~automodel_plugins.errors.UnexpectedKeysError` (unless
    ``allow_unused``: a pipeline stage holds only some of the model), :class:`ScaleError` for a scale the
    checkpoint lacks or whose header dtype or shape does not fit its weight, and :class:`ShapeMismatchError` /
    :class:`DtypeMismatchError` for a stored tensor that cannot become the model's (a BF16 weight with an FP8
    scale beside it included).

    ``sources`` holds ``adapter.from_hf(name)`` of every tensor when the caller already asked the adapter (a
    second plan of the same tensors, ``inspect``'s ``dequantize=False`` one): the answers are not asked again.
    ``checked`` names the tensors whose sources an earlier plan of the same tensors and sources already checked
    against the headers (shapes, boxes, scales: checks that do not depend on what is kept FP8); they are not
    checked again, and this plan adds the names it checks (when it names every source, the check that each key
    and scale key is in the checkpoint is not made again either). Dtype checks, which do, always run.
    """
    checked = set() if checked is None else checked
    if sources is None:
        sources = {name: adapter.from_hf(name) for name in tensors}
    stored = key_view(checkpoint)
    if not checked.issuperset(sources):  # an earlier plan of these sources found every key
        _refuse_absent_keys(sources, checkpoint)
    order = checkpoint.positions()
    keep, required = set(keep_fp8) | set(require_fp8), set(require_fp8)
    planned = {}
    for name in sorted(sources, key=lambda n: min(map(order.__getitem__, map(_KEY, sources[n].parts())))):
        source, target = sources[name], tensors[name]
        misfit = residency_misfit(source, tuple(target.shape), checkpoint) if name in keep else None
        if name in required and source.is_fp8 and misfit:
            raise DtypeMismatchError(
                f"model tensor {name!r} is an FP8-resident weight but the checkpoint's FP8 data cannot stay "
                f"FP8 ({misfit}); load it into a model built with dequantize=True",
                path=checkpoint.info(source.key).file,
                key=source.key,
            )
        if source.is_assembled:
            planned[name] = _plan_assembled(
                name,
                target,
                source,
                checkpoint,
                dtype,
                keep=name in keep,
                misfit=misfit,
                checked=name in checked,
            )
            checked.add(name)
            if name in required and planned[name].action != "kept_fp8":
                raise DtypeMismatchError(
                    f"model tensor {name!r} is an FP8-resident weight but the checkpoint stores its pieces "
                    "without FP8 scales; load it into a model built with dequantize=True",
                    path=checkpoint.info(source.key).file,
                    key=source.key,
                )
            continue
        kept = name in keep and source.is_fp8 and not misfit
        if name in required and not source.is_fp8:
            info = checkpoint.info(source.key)
            raise DtypeMismatchError(
                f"model tensor {name!r} is an FP8-resident weight but the checkpoint stores it as "
                f"{info.dtype} without a scale; load it into a model built with dequantize=True",
                path=info.file,
                key=source.key,
            )
        _check_compatible(name, target, source, checkpoint, kept=kept)
        if source.is_fp8 and name not in checked:
            _check_scale(source.parts()[0], checkpoint, checkpoint.info(source.key))
        checked.add(name)
        info = checkpoint.info(source.key)
        target_dtype = _target_dtype(target, dtype)
        planned[name] = PlannedTensor(
            source,
            loaded_dtype(info.dtype, fp8=source.is_fp8, dtype=target_dtype, keep_fp8=kept),
            action_for(info.dtype, fp8=source.is_fp8, dtype=target_dtype, keep_fp8=kept),
            numel=target.numel(),
            scale_numel=_scale_numel(source, tuple(info.shape)) + _activation_numel(source, checkpoint)
            if kept
            else 0,
            shape=tuple(target.shape),
            note=misfit or "",
        )
    plan = LoadPlan(planned)
    consumed = plan.consumed_keys()
    plan.unused_keys = list(filterfalse(consumed.__contains__, stored))
    _refuse_scales_beside_plain_weights(plan, checkpoint)
    if plan.unused_keys and not allow_unused:
        raise UnexpectedKeysError(plan.unused_keys, path=checkpoint.directory)
    return plan


def _refuse_absent_keys(sources: Mapping[str, TensorSource], checkpoint: Checkpoint) -> None:
    """Every source's data keys, then every FP8 piece's scale key, must be in the checkpoint."""
    stored = key_view(checkpoint)
    parts = list(chain.from_iterable(source.parts() for source in sources.values()))
    if all(map(stored.__contains__, map(_KEY, parts))) and all(
        map(stored.__contains__, filter(None, map(_SCALE_KEY, parts)))
    ):
        return  # checked in C; else the keys missing are gathered and named below
    missing = sorted(
        f"{name} (checkpoint key {key!r})"
        for name, src in sources.items()
        for key in src.data_keys
        if key not in stored
    )
    if missing:
        raise MissingKeysError(missing, path=checkpoint.directory)
    absent_scales = sorted(
        piece.scale_key
        for src in sources.values()
        for piece in src.parts()
        if piece.scale_key and piece.scale_key not in stored
    )
    if absent_scales:
        raise ScaleError(
            f"scale tensor(s) not in the checkpoint: {', '.join(absent_scales)}", path=checkpoint.directory
        )


def _target_dtype(target: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and target.dtype.is_floating_point else target.dtype


def _plan_assembled(
    name: str,
    target: torch.Tensor,
    source: TensorSource,
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    *,
    keep: bool = False,
    misfit: str | None = None,
    checked: bool = False,
) -> PlannedTensor:
    """Check every piece against the headers and the boxes against the tensor (unless ``checked``: done by an
    earlier plan, only the dtypes are checked); plan the assembled value."""
    shape = tuple(target.shape)
    kept = keep and source.is_fp8 and misfit is None
    if checked:
        parts = () if kept else source.parts()
        if parts and not _dtypes_fit(target, checkpoint.infos_of(map(_KEY, parts))):
            for piece in parts:
                _check_dtype(name, target, piece.key, checkpoint.info(piece.key), fp8=piece.is_fp8)
    else:
        _check_pieces(name, target, source, checkpoint, kept=kept)
    target_dtype = _target_dtype(target, dtype)
    stored = checkpoint.info(source.key).dtype
    if kept:
        block = source.parts()[0].block_size
        return PlannedTensor(
            source,
            stored,
            "kept_fp8",
            numel=target.numel(),
            scale_numel=(1 if block is None else math.prod(stacked_grid_shape(shape, block)))
            + _activation_numel(source, checkpoint),
            shape=shape,
        )
    return PlannedTensor(
        source,
        loaded_dtype(stored, fp8=source.is_fp8, dtype=target_dtype),
        "dequantized" if source.is_fp8 else "converted",
        numel=target.numel(),
        shape=shape,
        note=(misfit or "") if keep and source.is_fp8 else "",
    )


def _check_pieces(
    name: str, target: torch.Tensor, source: TensorSource, checkpoint: Checkpoint, *, kept: bool
) -> None:
    """Every piece's stored shape against its box, its dtype (unless ``kept``) and scale; the boxes' tiling."""
    if _pieces_fit(target, source.parts(), checkpoint, kept=kept):
        return
    shape = tuple(target.shape)
    boxes = []
    for piece in source.parts():
        info = checkpoint.info(piece.key)
        geometry, stored = _geometry_of(piece, shape, len(info.shape))
        if stored is None or info.shape != stored or len(geometry.box) != len(shape):
            raise ShapeMismatchError(
                f"checkpoint shape {tuple(info.shape)} cannot fill the box {list(geometry.box)} of model tensor "
                f"{name!r} (shape {shape}){' stored transposed' if piece.transposed else ''}: expected "
                f"{stored if stored is not None else 'a box whose left-out leading dims are 1'}",
                path=info.file,
                key=piece.key,
            )
        if not kept:  # kept pieces are FP8 codes held as stored, by an Fp8Experts (uint8 once built)
            _check_dtype(name, target, piece.key, info, fp8=piece.is_fp8)
        if piece.is_fp8:
            _check_scale(piece, checkpoint, info)
        boxes.append(geometry.box)
    if not boxes_tile(shape, boxes):
        raise ShapeMismatchError(
            f"the {len(boxes)} pieces of model tensor {name!r} (shape {shape}) do not cover it exactly once: "
            f"boxes {boxes[:4]}{' ...' if len(boxes) > 4 else ''}",
            path=checkpoint.info(source.key).file,
            key=source.key,
        )


def _pieces_fit(target: torch.Tensor, parts: Sequence[Piece], checkpoint: Checkpoint, *, kept: bool) -> bool:
    """Whether every check of :func:`_check_pieces` passes, made per distinct form instead of per piece: the
    stored shapes against the boxes and the boxes' tiling once per layout (:func:`_layout`: every MoE layer's
    experts share theirs), each distinct dtype once, each distinct scale form once; the pieces' headers read
    in C-level passes. ``False`` sends the caller to the piece-by-piece checks, which name the first bad key."""
    shape = tuple(target.shape)
    try:
        infos = checkpoint.infos_of(map(_KEY, parts))
        stored = list(map(_SHAPE, infos))
        layout = _layout(
            shape,
            tuple(map(_BOX, parts)),
            tuple(map(_TRANSPOSED, parts)),
            tuple(map(attrgetter("rope_heads"), parts)),
            tuple(map(len, stored)),
        )
    except (CheckpointError, TypeError):  # a key not stored, a box of lists (unhashable)
        return False
    if layout is None or stored != layout:
        return False
    if not kept and not _dtypes_fit(target, infos):
        return False
    fp8 = list(map(is_not, map(_SCALE_KEY, parts), repeat(None)))
    if not any(fp8):
        return True
    scaled = list(compress(parts, fp8))
    try:
        scales = checkpoint.infos_of(map(_SCALE_KEY, scaled))
    except CheckpointError:
        return False
    forms = set(
        zip(map(_DTYPE, scales), map(_SHAPE, scales), compress(stored, fp8), map(_BLOCK, scaled), strict=True)
    )
    return all(form in _SCALES_THAT_FIT or _scale_form_fits(form) for form in forms)


@functools.lru_cache(maxsize=1024)
def _layout(
    shape: tuple[int, ...],
    boxes: tuple[Box | None, ...],
    transposed: tuple[bool, ...],
    rope_heads: tuple[int | None, ...],
    stored_ndims: tuple[int, ...],
) -> list[tuple[int, ...]] | None:
    """The stored shape each piece's box needs, when every box has the tensor's rank, can be held by a stored
    tensor of its rank and the boxes tile the tensor exactly once; else ``None``. (A list: compared with the
    stored shapes in C.)"""
    needed = []
    for box, flipped, heads, ndim in zip(boxes, transposed, rope_heads, stored_ndims, strict=True):
        whole = box if box is not None else tuple((0, size) for size in shape)
        geometry, stored = _geometry(whole, ndim, flipped, heads)
        if stored is None or len(geometry.box) != len(shape):
            return None
        needed.append(stored)
    return needed if boxes_tile(shape, [b if b is not None else whole_box(shape) for b in boxes]) else None


def _dtypes_fit(target: torch.Tensor, infos: Sequence[TensorInfo]) -> bool:
    """:func:`_check_dtype` passes for every one of ``infos``: checked once per distinct dtype."""
    return all(_dtype_fits(target.dtype, dtype) for dtype in set(map(_DTYPE, infos)))


def _dtype_fits(target: torch.dtype, stored: torch.dtype) -> bool:
    both_float = target.is_floating_point and (stored.is_floating_point or is_fp8(stored))
    return both_float or stored == target


def _scale_form_fits(
    form: tuple[torch.dtype, tuple[int, ...], tuple[int, ...], tuple[int, int] | None],
) -> bool:
    """:func:`_check_scale`'s verdict on one (scale dtype, scale shape, weight shape, block size) form."""
    dtype, shape, weight, block = form
    check = check_stacked_scale_header if is_stacked(tuple(weight), block) else check_scale_header
    try:
        check(dtype, tuple(shape), weight_shape=tuple(weight), block_size=block, key="", path=None)
    except AutomodelPluginsError:
        return False
    if len(_SCALES_THAT_FIT) < 4096:
        _SCALES_THAT_FIT.add(form)
    return True


def residency_misfit(source: TensorSource, shape: tuple[int, ...], checkpoint: Checkpoint) -> str | None:
    """Why the FP8 data of a residency candidate of ``shape`` cannot be kept FP8, or ``None`` when it can.

    A 2-D weight stored as one tensor always can (:class:`~automodel_plugins.model.fp8_linear.Fp8Linear`), and
    one stored with its rows in Mistral's rotary order when its scales allow (:func:`_rotary_misfit`). A
    fused expert tensor ``[E, R, C]`` can when its codes and one block grid per expert can be put together
    from its pieces as they are stored: every piece FP8 of one dtype with block scales of one block size,
    none stored transposed, and every piece's box starting on a block boundary of its expert's matrix (so that
    each piece's grid is exactly a run of cells of the stacked grid). Only headers are read.
    """
    if not source.is_fp8:
        return None
    if len(shape) == 2 and not source.is_assembled:
        return None
    if len(shape) == 2:
        return _rotary_misfit(source, shape)
    if len(shape) != 3:
        return f"FP8 data of a {len(shape)}-D tensor made of pieces"
    parts = source.parts()
    if any(map(is_, map(_SCALE_KEY, parts), repeat(None))):
        return "some of its pieces are not FP8"
    blocks = set(map(_BLOCK, parts))
    if None in blocks:
        return "its FP8 scales are per tensor, not per block"
    if len(blocks) > 1:
        return f"its pieces use different block sizes {sorted(blocks)}"
    if len(set(map(_DTYPE, checkpoint.infos_of(map(_KEY, parts))))) > 1:
        return "its pieces are stored in different FP8 dtypes"
    if any(map(_TRANSPOSED, parts)):
        return "it is stored transposed"
    (block,) = blocks
    if _starts_on_blocks(parts, block):
        return None
    for piece in parts:
        box = piece.box_in(shape)
        if box[1][0] % block[0] or box[2][0] % block[1]:
            return (
                f"piece {piece.key!r} starts at row {box[1][0]}, column {box[2][0]} of its expert's matrix, "
                f"not on a {block[0]}x{block[1]} block boundary"
            )
    return None


def _starts_on_blocks(parts: Sequence[Piece], block: tuple[int, int]) -> bool:
    """Whether every piece's box (all given) starts on a block boundary of its expert's matrix, checked per
    distinct start (the experts of a layer share a few)."""
    boxes = list(map(_BOX, parts))
    if None in boxes:
        return False
    try:
        starts = set(
            zip(
                map(itemgetter(0), map(itemgetter(1), boxes)),
                map(itemgetter(0), map(itemgetter(2), boxes)),
                strict=True,
            )
        )
    except (IndexError, TypeError):
        return False
    return not any(row % block[0] or column % block[1] for row, column in starts)


def _rotary_misfit(source: TensorSource, shape: tuple[int, ...]) -> str | None:
    """A 2-D weight stored as one FP8 piece whose rows are in Mistral's rotary order (a native q/k projection)
    stays FP8 with its codes' rows permuted into the model's order and its scale as stored, which is exact
    when the permutation, which moves rows only within a head, never moves one out of its row of scale blocks:
    per-tensor scales, or block rows a multiple of the head's rows. Anything else made of pieces cannot."""
    parts = source.parts()
    piece = parts[0]
    if (
        len(parts) != 1
        or piece.rope_heads is None
        or piece.transposed
        or piece.box not in (None, whole_box(shape))
    ):
        return f"FP8 data of a {len(shape)}-D tensor made of pieces"
    rows = shape[0]
    if piece.rope_heads <= 0 or rows % (2 * piece.rope_heads):
        return f"its {rows} rows in rotary order do not split into {piece.rope_heads} heads of an even size"
    head = rows // piece.rope_heads
    if piece.block_size is not None and piece.block_size[0] % head:
        return (
            f"its rows are stored in Mistral's rotary order and permuted within heads of {head} rows, which "
            f"cross its {piece.block_size[0]}-row scale blocks (a permuted grid would not fit the codes)"
        )
    return None


def _scale_numel(source: TensorSource, shape: tuple[int, ...]) -> int:
    """Elements of the fp32 scale an FP8-resident weight keeps: one, or one per block (of each matrix)."""
    if source.block_size is None:
        return 1
    if is_stacked(shape, source.block_size):
        return math.prod(stacked_grid_shape(shape, source.block_size))
    return math.prod(grid_shape(shape, source.block_size))


def _activation_numel(source: TensorSource, checkpoint: Checkpoint) -> int:
    """Elements of the fp32 static activation scale an FP8-resident module keeps beside the weight (0: none)."""
    key = activation_scale_key(source)
    return 0 if key is None else math.prod(checkpoint.info(key).shape)


def _check_compatible(
    name: str, target: torch.Tensor, source: TensorSource, checkpoint: Checkpoint, *, kept: bool = False
) -> None:
    info = checkpoint.info(source.key)
    if tuple(info.shape) != tuple(target.shape):
        raise ShapeMismatchError(
            f"checkpoint shape {tuple(info.shape)} does not fit model tensor {name!r} of shape {tuple(target.shape)}",
            path=info.file,
            key=source.key,
        )
    if kept:
        return  # FP8 codes kept as stored: the module holding them is (or becomes) an Fp8Linear or Fp8Experts
    _check_dtype(name, target, source.key, info, fp8=source.is_fp8)


def _check_dtype(name: str, target: torch.Tensor, key: str, info: TensorInfo, *, fp8: bool) -> None:
    both_float = target.dtype.is_floating_point and (info.dtype.is_floating_point or is_fp8(info.dtype))
    if not both_float and info.dtype != target.dtype:
        raise DtypeMismatchError(
            f"checkpoint dtype {info.dtype} cannot load into model tensor {name!r} of dtype {target.dtype}",
            path=info.file,
            key=key,
        )


def _geometry_of(
    piece: Piece, shape: tuple[int, ...], stored_ndim: int
) -> tuple[PieceGeometry, tuple[int, ...] | None]:
    """:meth:`PieceGeometry.of` and its ``stored_shape``, shared by the pieces of equal boxes (the experts of
    every layer of a MoE share theirs)."""
    box = piece.box_in(shape)
    try:
        return _geometry(box, stored_ndim, piece.transposed, piece.rope_heads)
    except TypeError:  # a box of lists (unhashable): a geometry of its own
        geometry = PieceGeometry.of(piece, shape, stored_ndim)
        return geometry, geometry.stored_shape


@functools.lru_cache(maxsize=4096)
def _geometry(
    box: Box, stored_ndim: int, transposed: bool, rope_heads: int | None
) -> tuple[PieceGeometry, tuple[int, ...] | None]:
    geometry = PieceGeometry(box, stored_ndim, transposed, rope_heads)
    return geometry, geometry.stored_shape


_SCALES_THAT_FIT: set[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], tuple[int, int] | None]] = set()
"""(scale dtype, scale shape, weight shape, block size) the header checks passed for: what they check depends on
nothing else, and a 235B MoE asks about ~36k scales of a few distinct forms."""


def _check_scale(piece: Piece, checkpoint: Checkpoint, weight: TensorInfo) -> None:
    """What the header alone says about an FP8 tensor's scale (one grid per matrix of a stacked weight), so
    that ``inspect`` refuses what the load would. ``weight`` is the header of ``piece.key``."""
    scale = checkpoint.info(piece.scale_key)
    form = (scale.dtype, scale.shape, weight.shape, piece.block_size)
    if form in _SCALES_THAT_FIT:
        return
    check = (
        check_stacked_scale_header
        if is_stacked(tuple(weight.shape), piece.block_size)
        else check_scale_header
    )
    check(
        scale.dtype,
        tuple(scale.shape),
        weight_shape=tuple(weight.shape),
        block_size=piece.block_size,
        key=piece.scale_key,
        path=scale.file,
    )
    if len(_SCALES_THAT_FIT) < 4096:
        _SCALES_THAT_FIT.add(form)


def _refuse_scales_beside_plain_weights(plan: LoadPlan, checkpoint: Checkpoint) -> None:
    """An FP8 weight scale nobody reads, beside a weight this plan loads as it is stored: the checkpoint holds a
    plain (BF16, say) weight where the FP8 weight its scale was made for should be. Said as such, rather than
    as an unused scale key."""
    if not plan.unused_keys:
        return
    plain = {piece.key for p in plan.values() for piece in p.source.parts() if piece.scale_key is None}
    for key in plan.unused_keys:
        weight = weight_key_of_scale(key)
        if weight in plain:
            info = checkpoint.info(weight)
            raise DtypeMismatchError(
                f"weight is stored as {info.dtype} but its FP8 scale {key!r} is in the checkpoint: an FP8 weight "
                "was expected here (a weight saved without quantization, or a scale left behind)",
                path=info.file,
                key=weight,
            )
