"""The adapter most FP8 checkpoints need: prefix renames between the on-disk layout and the module tree, and
FP8 scales found beside their weights under any accepted name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, attrgetter, itemgetter, methodcaller
from typing import TYPE_CHECKING, Any

from automodel_plugins.adapters.base import Box, Piece, StateDictAdapter, TensorSource, key_view
from automodel_plugins.errors import CheckpointError, DtypeMismatchError, ScaleError
from automodel_plugins.fp8.formats import (
    ACTIVATION_SCALE_SUFFIXES,
    FP8_DTYPES,
    WEIGHT_SCALE_SUFFIXES,
    activation_key_candidates,
    scale_key_candidates,
    suffixes_in,
)
from automodel_plugins.fp8.quantization import parse_fp8_quantization
from automodel_plugins.sources.compressed_tensors import PER_CHANNEL_BLOCK

if TYPE_CHECKING:
    import torch

    from automodel_plugins.checkpoint import Checkpoint

_KEY = attrgetter("key")

__all__ = ["Fp8StateDictAdapter", "PrefixRename", "PrefixRenames", "fp8_adapter_for"]


@dataclass(frozen=True)
class PrefixRename:
    """``model`` prefix at runtime <-> ``checkpoint`` prefix on disk (e.g. ``lm_head.`` <-> ``language_model.lm_head.``)."""

    model: str
    checkpoint: str


class PrefixRenames:
    """Prefix rules applied both ways; the longest matching prefix wins, unmatched names are kept."""

    def __init__(self, rules: Iterable[PrefixRename] = ()) -> None:
        self.rules = tuple(rules)
        self._to_checkpoint = sorted(self.rules, key=lambda rule: -len(rule.model))
        self._to_model = sorted(self.rules, key=lambda rule: -len(rule.checkpoint))

    def to_checkpoint(self, name: str) -> str:
        """The checkpoint key of model name ``name``."""
        for rule in self._to_checkpoint:
            if name.startswith(rule.model):
                return rule.checkpoint + name[len(rule.model) :]
        return name

    def to_model(self, key: str) -> str:
        """The model name of checkpoint key ``key`` (the inverse of :meth:`to_checkpoint`)."""
        for rule in self._to_model:
            if key.startswith(rule.checkpoint):
                return rule.model + key[len(rule.checkpoint) :]
        return key


@dataclass
class Fp8StateDictAdapter(StateDictAdapter):
    """The adapter most FP8 checkpoints need: prefix renames plus FP8 scales found next to their weights.

    For each model tensor it renames the name into the checkpoint's layout, and when the stored tensor is FP8
    it finds the weight scale under any accepted spelling (``weight_scale_inv``, ``weight_scale``,
    ``qscale_weight``) and accounts for the static activation scale (``activation_scale``, ``input_scale``,
    ``qscale_act``), which BF16 training does not use. ``modules_to_not_convert`` (runtime module prefixes, as
    in the config's ``quantization_config``) must hold no FP8 tensor: config and checkpoint disagreeing is an
    error, not a guess. ``fp8_dtype``, when set (the format the config's ``quantization_config.fmt`` names), is
    the only FP8 dtype a weight may have: bytes of another format decode to other values.
    """

    checkpoint: Checkpoint
    renames: Sequence[PrefixRename] = ()
    block_size: tuple[int, int] | None = None
    modules_to_not_convert: Iterable[str] = ()
    layout: str = "runtime"
    fp8_dtype: torch.dtype | None = None
    _seen_scale_names: set[str] = field(default_factory=set, init=False, repr=False)
    _listed: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    _suffixes: tuple[tuple[str, ...], tuple[str, ...]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._renames = PrefixRenames(self.renames)
        self.modules_to_not_convert = tuple(self.modules_to_not_convert)
        self._not_converted = frozenset(self.modules_to_not_convert)
        if self.block_size is not None:
            self.block_size = (int(self.block_size[0]), int(self.block_size[1]))

    def to_hf(self, name: str) -> str:
        return self._renames.to_checkpoint(name)

    def from_hf_key(self, key: str) -> str:
        """The model name of a checkpoint data key (the inverse of :meth:`to_hf`)."""
        return self._renames.to_model(key)

    def from_hf(self, name: str) -> TensorSource:
        return self.piece(self.to_hf(name), name=name).stored_source()

    def piece(
        self, key: str, box: Box | None = None, *, transposed: bool = False, name: str | None = None
    ) -> Piece:
        """The checkpoint tensor ``key`` as a piece filling ``box`` of a model tensor (``None``: all of it),
        stored ``transposed`` or not: its FP8 scale found under any accepted name when it is FP8, its static
        activation scale accounted for. ``name`` (the model tensor) is checked against
        ``modules_to_not_convert``; a key the checkpoint lacks gives a plain piece, which planning reports."""
        return self._piece(key, box, transposed, name, key_view(self.checkpoint))

    def assembled(
        self, name: str, pieces: Iterable[tuple[str, Box | None]], *, transposed: bool = False
    ) -> TensorSource:
        """The model tensor ``name`` assembled from ``(checkpoint key, box)`` pairs, each FP8 piece with its
        own scale (see :meth:`piece`)."""
        pairs, keys = list(pieces), key_view(self.checkpoint)
        made = self._fp8_pieces(name, pairs, transposed, keys)
        if made is None:
            made = [self._piece(key, box, transposed, name, keys) for key, box in pairs]
        return TensorSource.assembled(made)

    def _fp8_pieces(
        self, name: str, pairs: list[tuple[str, Box | None]], transposed: bool, keys: Collection[str]
    ) -> list[Piece] | None:
        """What :meth:`_piece` makes of each pair, made in C-level passes for the common case (a fused experts
        tensor's 256 pieces): every key stored, FP8 of the declared format, named ``*.weight``, with its scale
        under the one scale suffix the checkpoint uses and no activation scale. ``None`` for anything else,
        which :meth:`_piece` then answers (or refuses, naming the first key at fault) pair by pair."""
        infos_of = getattr(self.checkpoint, "infos_of", None)
        if infos_of is None or not pairs:
            return None
        try:
            infos = infos_of(map(itemgetter(0), pairs))
        except CheckpointError:  # a key not stored: a plain piece, reported by planning
            return None
        names = list(map(_KEY, infos))  # the checkpoint's own key objects: later lookups match by identity
        dtypes = set(map(attrgetter("dtype"), infos))
        scales, activations = self._sibling_suffixes(keys)
        (dtype,) = dtypes if len(dtypes) == 1 else (None,)
        if (
            dtype not in FP8_DTYPES
            or (self.fp8_dtype is not None and dtype != self.fp8_dtype)
            or self._never_converted(name)
            or len(scales) != 1
            or activations
            or not all(map(methodcaller("endswith", ".weight"), names))
        ):
            return None
        try:
            scale_keys = list(
                map(
                    _KEY,
                    infos_of(
                        map(add, map(itemgetter(slice(None, -len("weight"))), names), repeat(scales[0]))
                    ),
                )
            )
        except CheckpointError:  # a scale not stored: refused, naming its weight, by _piece
            return None
        self._seen_scale_names.add(scales[0])
        boxes = map(itemgetter(1), pairs)
        return list(map(Piece, names, boxes, scale_keys, repeat(self.block_size), repeat(transposed)))

    def _piece(
        self, key: str, box: Box | None, transposed: bool, name: str | None, keys: Collection[str]
    ) -> Piece:
        """:meth:`piece`, given the checkpoint's keys (a fused experts tensor asks for 256 pieces at once)."""
        stored = self.checkpoint.info(key) if key in keys else None
        if stored is None or stored.dtype not in FP8_DTYPES:
            return Piece(key, box, None, None, transposed)
        if self.fp8_dtype is not None and stored.dtype != self.fp8_dtype:
            raise DtypeMismatchError(
                f"FP8 weight is stored as {stored.dtype} but the config's quantization_config declares "
                f"{self.fp8_dtype}: its bytes would decode to other values",
                path=stored.file,
                key=key,
            )
        if self._never_converted(name if name is not None else self.from_hf_key(key)):
            raise CheckpointError(
                f"tensor is FP8 but its module is listed in quantization_config.modules_to_not_convert "
                f"({', '.join(self.modules_to_not_convert)}); config and checkpoint disagree",
                path=self.checkpoint.info(key).file,
                key=key,
            )
        scales, activations = self._sibling_suffixes(keys)
        dropped = [k for k in activation_key_candidates(key, activations) if k in keys] if activations else ()
        return Piece(
            key,
            box,
            self._scale_key(key, keys, scales),
            self.block_size,
            transposed,
            tuple(dropped) if dropped else (),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": type(self).__name__,
            "layout": self.layout,
            "granularity": self._granularity(),
            "scale_names": sorted(self._seen_scale_names),
        }

    def _granularity(self) -> str | None:
        """How the FP8 tensors met so far are scaled; None before any (or for an unquantized checkpoint)."""
        if not self._seen_scale_names:
            return None
        if self.block_size is None:
            return "per-tensor"
        if self.block_size == PER_CHANNEL_BLOCK:
            return "per-channel"
        return f"block {self.block_size[0]}x{self.block_size[1]}"

    def _sibling_suffixes(self, keys: Collection[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The weight- and activation-scale suffixes a sibling in the checkpoint may have (see
        :func:`~automodel_plugins.fp8.formats.suffixes_in`), found once: a 235B MoE's 36k FP8 pieces would
        otherwise look up six names each, of which one exists. Every suffix for a stand-in key view (it may
        still change)."""
        if not hasattr(self.checkpoint, "stored_keys"):
            return WEIGHT_SCALE_SUFFIXES, ACTIVATION_SCALE_SUFFIXES
        if self._suffixes is None:
            self._suffixes = (
                suffixes_in(keys, WEIGHT_SCALE_SUFFIXES),
                suffixes_in(keys, ACTIVATION_SCALE_SUFFIXES),
            )
        return self._suffixes

    def _scale_key(self, key: str, stored: Collection[str], suffixes: tuple[str, ...]) -> str:
        present = [k for k in scale_key_candidates(key, suffixes) if k in stored]
        if not present:
            raise ScaleError(
                f"FP8 weight has no scale (looked for {', '.join(scale_key_candidates(key))})",
                path=self.checkpoint.info(key).file,
                key=key,
            )
        if len(present) > 1:
            raise ScaleError(
                f"FP8 weight has several scales ({', '.join(present)}); which one applies is ambiguous",
                path=self.checkpoint.info(key).file,
                key=key,
            )
        self._seen_scale_names.add(present[0].rsplit(".", 1)[-1])
        return present[0]

    def _never_converted(self, name: str) -> bool:
        """``name`` is a listed module or inside one (remembered per name: the 256 pieces of a fused experts
        tensor share their model tensor's name)."""
        listed = self._listed.get(name)
        if listed is None:
            self._listed[name] = listed = self._listed_module(name)
        return listed

    def _listed_module(self, name: str) -> bool:
        """Whether ``name`` or one of its dotted prefixes is listed (a set lookup per prefix, not a scan of the
        list per tensor: a 235B MoE lists ~100 modules for ~73k tensors)."""
        if name in self._not_converted:
            return True
        end = name.find(".")
        while end != -1:
            if name[:end] in self._not_converted:
                return True
            end = name.find(".", end + 1)
        return False


def fp8_adapter_for(
    config: Any, checkpoint: Checkpoint, *, renames: Sequence[PrefixRename] = (), layout: str = "runtime"
) -> Fp8StateDictAdapter:
    """The FP8 adapter a config's ``quantization_config`` asks for (block size, modules never converted).

    An unquantized config gets the same adapter with nothing to dequantize; an unsupported quantization
    method raises :class:`~automodel_plugins.errors.UnsupportedQuantizationError` naming the field.
    """
    config_file = checkpoint.config_path if checkpoint.config_path.is_file() else None
    quantization = parse_fp8_quantization(config, path=config_file)
    return Fp8StateDictAdapter(
        checkpoint,
        renames=renames,
        block_size=quantization.weight_block_size if quantization else None,
        modules_to_not_convert=quantization.modules_to_not_convert if quantization else (),
        layout=layout,
        fp8_dtype=quantization.fp8_dtype() if quantization else None,
    )
