"""The save plan: for every tensor a model holds, the key, dtype and shape it is written with, and its FP8 scale.

Planning reads headers only (the model's tensor shapes and dtypes, the source checkpoint's headers), so every
rank of a sharded run computes the same plan, and with it the same files and headers. Four formats:

* ``"source"``: the checkpoint the model was loaded from, through its adapter run backwards. Each model
  tensor goes under the key it came from (legacy layout stays legacy, runtime stays runtime) in the dtype it had
  there; an FP8 weight keeps its FP8 dtype and its scale's key, dtype and shape (0-d, ``[1]`` or a grid); the
  source tensors nobody loads (static activation scales) are carried over unchanged; the
  ``quantization_config`` is the source's own. A tensor the source does not have (new modules) is written
  unquantized in the model's dtype. A tensor the source assembled from pieces is split back into them: each
  piece's box of the model tensor (its stored orientation) is written under the piece's key, in its dtype,
  an FP8 piece with its own scale (kept while the piece's values fit it).
* ``"fp8-tensor"`` / ``"fp8-block"``: transformers' FP8 format (``FineGrainedFP8Config``): every plain
  ``nn.Linear`` weight that ``modules_to_not_convert`` does not exclude (matched as transformers' loader
  matches it) as ``float8_e4m3fn`` with an fp32 ``weight_scale_inv`` (0-d, or one per ``block_size`` block),
  dynamic activations; everything else in the model's dtype; keys as ``save_pretrained`` writes them.
* ``"none"``: the model's own dtypes under ``save_pretrained``'s keys: what stock ``save_pretrained`` writes.

Where the weight was FP8 in the source with the same granularity, its source scale is named in the plan, so
the writer can keep it (see :mod:`automodel_plugins.fp8.scale_policy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.adapters.pieces import PieceGeometry
from automodel_plugins.checkpoint.writer import TensorSpec
from automodel_plugins.errors import SaveError, SaveOptionError, UnknownQuantizationError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.scales import grid_shape
from automodel_plugins.fp8.stacked import is_stacked, stacked_grid_shape
from automodel_plugins.sources import compressed_tensors

if TYPE_CHECKING:
    from automodel_plugins.adapters import Piece, StateDictAdapter
    from automodel_plugins.checkpoint import Checkpoint

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZATIONS",
    "PlannedScale",
    "PlannedWrite",
    "SaveFormat",
    "SavePlan",
    "SourceView",
    "fp8_quantization_config",
    "partial_blocks",
    "plan_save",
    "saved_dtype",
]

QUANTIZATIONS = ("source", "fp8-tensor", "fp8-block", "none")
DEFAULT_BLOCK_SIZE = (128, 128)
_FP8_SCALE_SUFFIX = "weight_scale_inv"


@dataclass(frozen=True)
class SaveFormat:
    """What a save writes: one of :data:`QUANTIZATIONS`, the block size of ``"fp8-block"`` and, for the FP8
    formats, the modules kept unquantized (``None``: the source's list, else transformers' default)."""

    quantization: str
    block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] | None = None

    @classmethod
    def parse(
        cls,
        quantization: str,
        *,
        block_size: int | Sequence[int] | None = None,
        modules_to_not_convert: Sequence[str] | None = None,
    ) -> SaveFormat:
        if quantization not in QUANTIZATIONS:
            raise UnknownQuantizationError(
                f"unknown quantization {quantization!r}: pass one of {', '.join(map(repr, QUANTIZATIONS))} "
                "('source': the format the weights were loaded from; 'fp8-tensor' / 'fp8-block': transformers' "
                "FP8 format; 'none': the model's dtype, as stock save_pretrained writes)"
            )
        if block_size is not None and quantization != "fp8-block":
            raise SaveOptionError(f"block_size applies to quantization='fp8-block', not {quantization!r}")
        if modules_to_not_convert is not None and quantization not in ("fp8-tensor", "fp8-block"):
            raise SaveOptionError(
                f"modules_to_not_convert applies to the fp8-tensor / fp8-block formats, not {quantization!r}"
            )
        if isinstance(modules_to_not_convert, str):
            raise SaveOptionError("modules_to_not_convert must be a list of module names, not a string")
        block = None
        if quantization == "fp8-block":
            block = _block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        skip = None if modules_to_not_convert is None else _module_patterns(modules_to_not_convert)
        return cls(quantization, block, skip)

    @property
    def is_fp8_format(self) -> bool:
        return self.quantization in ("fp8-tensor", "fp8-block")


def _block_size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        sizes: tuple[object, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        sizes = tuple(value)
    else:
        sizes = ()
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise SaveOptionError(f"block_size must be a positive int or two of them, got {value!r}")
    return (int(sizes[0]), int(sizes[1]))


def _module_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """The modules an FP8 format keeps unquantized, checked: each a non-empty string that compiles as a
    regular expression (transformers matches them as prefixes, regexes and suffixes: ``""`` would match every
    module and quantize nothing)."""
    import re

    checked = tuple(patterns)
    for position, pattern in enumerate(checked):
        if not isinstance(pattern, str):
            raise SaveOptionError(
                f"modules_to_not_convert[{position}] is {pattern!r}, not a module name (a string)"
            )
        if not pattern.strip():
            raise SaveOptionError(
                f"modules_to_not_convert[{position}] is the empty name {pattern!r}: it matches every module, "
                "so nothing would be quantized; remove it"
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SaveOptionError(
                f"modules_to_not_convert[{position}] {pattern!r} is not a valid pattern "
                f"(transformers matches the entries as regular expressions): {exc}"
            ) from exc
    return checked


@dataclass(frozen=True)
class PlannedScale:
    """An FP8 weight's scale: written under ``key`` as ``dtype`` and ``shape`` (0-d or ``[1]`` per tensor, a grid
    per ``block_size``); ``source_key`` is the source scale to keep while the weight still fits it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    block_size: tuple[int, int] | None
    source_key: str | None = None
    source_index: tuple[int, ...] | None = None
    """Where this weight's scale lies within ``source_key`` (one expert's of a ``[E, 1, 1]`` scale); ``None``:
    all of it."""


@dataclass(frozen=True)
class PlannedWrite:
    """One model tensor as written: its value under ``key`` in ``dtype`` (FP8 when ``scale`` is set), and the
    source tensors ``carried`` over unchanged beside it.

    A piece of a model tensor (``piece_of`` set: the model tensor's name) writes the box ``geometry`` gives,
    in its stored orientation; its ``name`` is then the piece's key, which the values of the save resolve
    (:class:`~automodel_plugins.pipeline.save.values.PieceValues`)."""

    name: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: PlannedScale | None = None
    carried: tuple[TensorSpec, ...] = ()
    piece_of: str | None = None
    geometry: PieceGeometry | None = None

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor this entry writes: the value, its scale, the carried ones."""
        specs = [TensorSpec(self.key, self.dtype, self.shape)]
        if self.scale is not None:
            specs.append(TensorSpec(self.scale.key, self.scale.dtype, self.scale.shape))
        return specs + list(self.carried)


@dataclass
class SavePlan:
    """The planned tensors in the order they are saved, and the ``quantization_config`` the config declares."""

    format: SaveFormat
    tensors: list[PlannedWrite]
    quantization_config: dict[str, Any] | None
    partial_blocks: list[str] = field(default_factory=list)
    """FP8-block weights whose sizes the block size does not divide (stock transformers 5.x misreads them)."""

    def specs(self) -> list[TensorSpec]:
        return [spec for planned in self.tensors for spec in planned.specs]

    @property
    def quantized(self) -> list[PlannedWrite]:
        return [planned for planned in self.tensors if planned.scale is not None]


@dataclass
class SourceView:
    """The checkpoint a model came from, opened (headers only), with the adapter that maps it, and its
    ``quantization_config`` as written there."""

    checkpoint: Checkpoint
    adapter: StateDictAdapter
    quantization_config: dict[str, Any] | None


@dataclass(frozen=True)
class ModelTensor:
    """What planning needs of a model tensor: its global shape and dtype, and the ``nn.Linear`` it is the
    weight of (``None`` otherwise)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    linear: str | None = None


def fp8_quantization_config(
    block_size: tuple[int, int] | None, modules_to_not_convert: Sequence[str]
) -> dict[str, Any]:
    """transformers' ``FineGrainedFP8Config`` for what an FP8 format writes, as a plain JSON dict."""
    from transformers import FineGrainedFP8Config

    config = FineGrainedFP8Config(
        activation_scheme="dynamic",
        weight_block_size=block_size,
        modules_to_not_convert=list(modules_to_not_convert) or None,
    )
    return json.loads(json.dumps(config.to_dict()))


def plan_save(
    tensors: Mapping[str, ModelTensor],
    save_format: SaveFormat,
    *,
    hf_keys: Mapping[str, str] | None,
    source: SourceView | None,
    declared: Mapping[str, Any] | None = None,
    default_not_converted: Sequence[str] = (),
) -> SavePlan:
    """Plan writing ``tensors`` (model name -> :class:`ModelTensor`, in the order they are saved).

    ``hf_keys``: the checkpoint key of each model name and FP8 scale name in transformers' layout (needed
    except for ``"source"``); ``source``: the checkpoint the model came from (needed for ``"source"``, used
    by the FP8 formats to keep source scales); ``declared``: the ``quantization_config`` the weights were
    loaded under (its ``modules_to_not_convert`` is an FP8 format's default); ``default_not_converted``: the
    modules an FP8 format keeps unquantized when neither the caller nor ``declared`` names any.
    """
    fp8_dtypes = {t.dtype for t in tensors.values() if is_fp8(t.dtype)}
    if fp8_dtypes:
        names = sorted(name for name, t in tensors.items() if is_fp8(t.dtype))
        raise SaveError(
            f"the model holds FP8 tensors ({', '.join(names[:3])}...): it is transformers' own FP8 model, "
            "which its model.save_pretrained writes"
        )
    if save_format.quantization == "source":
        if source is None:
            raise SaveError("quantization='source' needs the source checkpoint")
        planned = [entry for name, tensor in tensors.items() for entry in _from_source(name, tensor, source)]
        return SavePlan(save_format, planned, source.quantization_config)
    if hf_keys is None:
        raise SaveError(f"quantization={save_format.quantization!r} needs transformers' key layout")
    if save_format.quantization == "none":
        planned = [PlannedWrite(name, hf_keys[name], t.dtype, t.shape) for name, t in tensors.items()]
        return SavePlan(save_format, planned, None)
    skip = _not_converted(save_format, declared, default_not_converted, tensors, source)
    planned = [_fp8_format(name, t, save_format, skip, hf_keys, source) for name, t in tensors.items()]
    plan = SavePlan(save_format, planned, fp8_quantization_config(save_format.block_size, skip))
    plan.partial_blocks = partial_blocks(plan)
    return plan


def saved_dtype(plan: SavePlan) -> torch.dtype | None:
    """The floating-point dtype of the values a plan writes unquantized, by element count (FP8 weights, their
    scales and carried activation scales aside): what ``config.json``'s ``dtype`` must name. ``None`` when it
    writes no such tensor."""
    sizes: dict[torch.dtype, int] = {}
    for planned in plan.tensors:
        if planned.scale is None and planned.dtype.is_floating_point and not is_fp8(planned.dtype):
            sizes[planned.dtype] = sizes.get(planned.dtype, 0) + math.prod(planned.shape)
    return max(sizes, key=lambda dtype: sizes[dtype]) if sizes else None


def fp8_scale_name(weight_name: str) -> str:
    """The model-side name of a weight's FP8 scale (``q_proj.weight`` -> ``q_proj.weight_scale_inv``)."""
    return weight_name.removesuffix("weight") + _FP8_SCALE_SUFFIX


def _from_source(name: str, tensor: ModelTensor, source: SourceView) -> list[PlannedWrite]:
    """How ``name`` goes back into the source's layout: one entry, or one per piece it was assembled from."""
    where = source.adapter.from_hf(name)
    checkpoint = source.checkpoint
    if not where.is_assembled:
        if where.key not in checkpoint:
            return [PlannedWrite(name, where.key, tensor.dtype, tensor.shape)]
        return [_stored_as(name, where.parts()[0], tensor, tensor.shape, checkpoint)]
    missing = [piece.key for piece in where.pieces if piece.key not in checkpoint]
    if missing:
        raise SaveError(
            f"tensor {name!r} is assembled from pieces the source checkpoint lacks ({', '.join(missing[:3])}): "
            "it cannot be written back in the source's format",
            path=checkpoint.directory,
        )
    entries = []
    for piece in where.pieces:
        geometry = PieceGeometry.of(piece, tensor.shape, len(checkpoint.info(piece.key).shape))
        stored = geometry.stored_shape
        if stored is None or tuple(checkpoint.info(piece.key).shape) != stored:
            raise SaveError(
                f"piece {piece.key!r} of {name!r} (shape {tensor.shape}) does not fit the source's "
                f"{tuple(checkpoint.info(piece.key).shape)}: the model's shape changed since the load",
                path=checkpoint.directory,
            )
        entry = _stored_as(piece.key, piece, tensor, stored, checkpoint)
        entries.append(dataclasses.replace(entry, piece_of=name, geometry=geometry))
    return entries


def _stored_as(
    name: str, piece: Piece, tensor: ModelTensor, shape: tuple[int, ...], checkpoint: Checkpoint
) -> PlannedWrite:
    """A stored tensor of the source written back: its key, dtype (FP8 with its scale's key, dtype and shape,
    the source scale kept while the values fit it), and the dropped tensors carried beside it."""
    info = checkpoint.info(piece.key)
    carried = tuple(
        TensorSpec(k, checkpoint.info(k).dtype, checkpoint.info(k).shape) for k in piece.dropped_keys
    )
    if not piece.is_fp8:
        both_float = info.dtype.is_floating_point and tensor.dtype.is_floating_point
        dtype = info.dtype if both_float or info.dtype == tensor.dtype else tensor.dtype
        return PlannedWrite(name, piece.key, dtype, shape, carried=carried)
    scale_info = checkpoint.info(piece.scale_key)
    same_shape = tuple(info.shape) == shape
    if piece.block_size is None:
        scale_shape = tuple(scale_info.shape)
    elif is_stacked(shape, piece.block_size):
        scale_shape = stacked_grid_shape(shape, piece.block_size)
    else:
        scale_shape = grid_shape(shape, piece.block_size)
    scale = PlannedScale(
        piece.scale_key,
        scale_info.dtype,
        scale_shape,
        piece.block_size,
        source_key=piece.scale_key if same_shape else None,
    )
    return PlannedWrite(name, piece.key, info.dtype, shape, scale=scale, carried=carried)


def _not_converted(
    save_format: SaveFormat,
    declared: Mapping[str, Any] | None,
    default: Sequence[str],
    tensors: Mapping[str, ModelTensor],
    source: SourceView | None,
) -> tuple[str, ...]:
    """The modules an FP8 format keeps unquantized: the caller's list; else, for a quantized source, the
    source's choice (its ``modules_to_not_convert``, or the module names of a compressed-tensors ``ignore``,
    and every linear the source stores unquantized: what ``re:`` patterns and native ignore lists matched);
    else transformers' default."""
    if save_format.modules_to_not_convert is not None:
        return save_format.modules_to_not_convert
    declared = declared or {}
    method = declared.get("quant_method")
    if method == "fp8":
        listed = tuple(declared.get("modules_to_not_convert") or declared.get("ignored_layers") or ())
    elif method == compressed_tensors.METHOD:
        ignore = declared.get("ignore") or []
        listed = tuple(entry for entry in ignore if isinstance(entry, str) and not entry.startswith("re:"))
        if source is None and len(listed) != len(ignore):
            raise SaveError(
                "the model was loaded from compressed-tensors FP8 whose ignore list has re: patterns, resolved "
                "against the source checkpoint's tensors, which cannot be reopened (changed or gone): pass "
                "modules_to_not_convert=[...] to say which modules stay unquantized"
            )
    else:
        return tuple(sorted(default))
    if source is None:
        return listed
    from transformers.quantizers.quantizers_utils import should_convert_module

    linears = [t.linear for t in tensors.values() if t.linear is not None]
    kept = {
        t.linear
        for name, t in tensors.items()
        if t.linear is not None
        and should_convert_module(t.linear, list(listed))
        and _stored_unquantized(name, source)
    }
    return listed + _covering(kept, [m for m in linears if should_convert_module(m, list(listed))])


def _stored_unquantized(name: str, source: SourceView) -> bool:
    """Whether the source checkpoint holds ``name`` and stores none of it as FP8."""
    checkpoint = source.checkpoint
    parts = source.adapter.from_hf(name).parts()
    return all(
        piece.key in checkpoint and not piece.is_fp8 and not is_fp8(checkpoint.info(piece.key).dtype)
        for piece in parts
    )


def _covering(kept: set[str], linears: Sequence[str]) -> tuple[str, ...]:
    """Few names that, as transformers matches ``modules_to_not_convert``, exclude exactly the linears ``kept``
    of ``linears``: each kept module's highest ancestor whose linears are all kept (``model.visual``), or the
    names themselves where shorter names would match more."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not kept:
        return ()

    def under(prefix: str) -> list[str]:
        return [m for m in linears if m == prefix or m.startswith(prefix + ".")]

    names: set[str] = set()
    for module in kept:
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if all(m in kept for m in under(prefix)):
                names.add(prefix)
                break

    def exact(candidate: Sequence[str]) -> bool:
        return all(should_convert_module(m, list(candidate)) == (m not in kept) for m in linears)

    covering = sorted(names)
    if not exact(covering):
        return tuple(sorted(kept))
    for suffix in sorted({_layer_suffix(name) for name in covering} - {None}):
        shorter = [name for name in covering if _layer_suffix(name) != suffix] + [suffix]
        if exact(shorter):  # ``self_attn.q_a_proj`` for every layer's (transformers matches suffixes)
            covering = shorter
    return tuple(covering)


def _layer_suffix(name: str) -> str | None:
    """What follows the last layer index of ``name`` (``layers.3.mlp.gate`` -> ``mlp.gate``), if anything."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdecimal()]
    if not indices or indices[-1] == len(parts) - 1:
        return None
    return ".".join(parts[indices[-1] + 1 :])


def _fp8_format(
    name: str,
    tensor: ModelTensor,
    save_format: SaveFormat,
    skip: Sequence[str],
    hf_keys: Mapping[str, str],
    source: SourceView | None,
) -> PlannedWrite:
    from transformers.quantizers.quantizers_utils import should_convert_module

    key = hf_keys[name]
    if (
        tensor.linear is None
        or len(tensor.shape) != 2
        or not should_convert_module(tensor.linear, list(skip))
    ):
        return PlannedWrite(name, key, tensor.dtype, tensor.shape)
    block = save_format.block_size
    shape = () if block is None else grid_shape(tensor.shape, block)
    scale = PlannedScale(
        hf_keys[fp8_scale_name(name)],
        torch.float32,
        shape,
        block,
        _reusable_scale(name, tensor, block, source),
    )
    return PlannedWrite(name, key, torch.float8_e4m3fn, tensor.shape, scale=scale)


def _reusable_scale(
    name: str, tensor: ModelTensor, block: tuple[int, int] | None, source: SourceView | None
) -> str | None:
    """The source scale of ``name`` when the source stored it as E4M3 with this granularity and shape (per
    tensor, also as one piece whose rows are only permuted, Mistral-native q/k: one scale covers any order)."""
    if source is None:
        return None
    where = source.adapter.from_hf(name)
    only = where.pieces[0] if len(where.pieces) == 1 else None
    if block is None and only is not None and only.box is None and not only.transposed:
        where = only.stored_source()
    if (
        where.is_assembled
        or not where.is_fp8
        or where.key not in source.checkpoint
        or where.block_size != block
    ):
        return None
    info = source.checkpoint.info(where.key)
    if info.dtype != torch.float8_e4m3fn or tuple(info.shape) != tensor.shape:
        return None
    if block is None and math.prod(source.checkpoint.info(where.scale_key).shape) != 1:
        return None
    return where.scale_key


def partial_blocks(plan: SavePlan) -> list[str]:
    """Keys of the planned FP8-block weights whose sizes the block size does not divide."""
    block = plan.format.block_size
    if block is None:
        return []
    return [
        planned.key
        for planned in plan.quantized
        if planned.shape[0] % block[0] or planned.shape[1] % block[1]
    ]
