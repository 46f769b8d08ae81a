"""State-dict adapters: pure name mappings between a model's tensors and one checkpoint's keys.

Modelled on torchtitan's ``StateDictAdapter`` (``from_hf`` / ``to_hf``), but per tensor instead of per state
dict, so the host can stream: it asks the adapter where one model tensor lives, reads that tensor (or only the
slice a rank owns), dequantizes it, and moves on. Nothing here reads tensor data; checkpoint headers suffice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from automodel_plugins import fp8
from automodel_plugins.errors import CheckpointError, ScaleError

if TYPE_CHECKING:
    import torch

    from automodel_plugins.checkpoint import Checkpoint


@dataclass(frozen=True)
class TensorSource:
    """Where one model tensor's value lives in the checkpoint and how it is stored.

    ``scale_key`` set means ``key`` holds FP8 data to be multiplied by that scale (one per tensor when
    ``block_size`` is None, else one per ``block_size`` block). ``dropped_keys`` are read by nobody but are
    accounted for, so that strict key accounting still catches every key nobody consumed.
    """

    key: str
    scale_key: str | None = None
    block_size: tuple[int, int] | None = None
    dropped_keys: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every checkpoint key this tensor accounts for."""
        return (self.key,) + ((self.scale_key,) if self.scale_key else ()) + self.dropped_keys

    @property
    def is_fp8(self) -> bool:
        return self.scale_key is not None


class StateDictAdapter(ABC):
    """Maps model tensor names to checkpoint sources (``from_hf``) and back (``to_hf``)."""

    @abstractmethod
    def from_hf(self, name: str) -> TensorSource:
        """Where the model tensor ``name`` (a ``state_dict`` key of the stock model) lives in the checkpoint."""

    @abstractmethod
    def to_hf(self, name: str) -> str:
        """The checkpoint key the model tensor ``name`` is stored under in this checkpoint's layout."""

    def to_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a model state dict into this checkpoint's layout (values untouched, not re-quantized)."""
        return {self.to_hf(name): tensor for name, tensor in state_dict.items()}

    def describe(self) -> dict[str, Any]:
        """What this adapter does, for ``inspect`` and the load record."""
        return {"adapter": type(self).__name__}


@dataclass(frozen=True)
class PrefixRename:
    """``model`` prefix at runtime <-> ``checkpoint`` prefix on disk (e.g. ``lm_head.`` <-> ``language_model.lm_head.``)."""

    model: str
    checkpoint: str


def _rename(name: str, renames: Sequence[PrefixRename], *, to_checkpoint: bool) -> str:
    """Apply the first (longest) matching prefix rule; names no rule matches are kept as they are."""
    for rule in renames:
        src, dst = (rule.model, rule.checkpoint) if to_checkpoint else (rule.checkpoint, rule.model)
        if name.startswith(src):
            return dst + name[len(src) :]
    return name


@dataclass
class Fp8StateDictAdapter(StateDictAdapter):
    """The adapter most FP8 checkpoints need: prefix renames plus FP8 scales found next to their weights.

    For each model tensor it renames the name into the checkpoint's layout, and when the stored tensor is FP8
    it finds the weight scale under any accepted spelling (``weight_scale_inv``, ``weight_scale``,
    ``qscale_weight``) and accounts for the static activation scale (``activation_scale``, ``input_scale``,
    ``qscale_act``), which BF16 training does not use. ``modules_to_not_convert`` (runtime module prefixes, as
    in the config's ``quantization_config``) must hold no FP8 tensor: config and checkpoint disagreeing is an
    error, not a guess.
    """

    checkpoint: Checkpoint
    renames: Sequence[PrefixRename] = ()
    block_size: tuple[int, int] | None = None
    modules_to_not_convert: Iterable[str] = ()
    layout: str = "runtime"
    _seen_scale_names: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.renames = sorted(self.renames, key=lambda rule: -len(rule.model))
        self._reverse = sorted(self.renames, key=lambda rule: -len(rule.checkpoint))
        self.modules_to_not_convert = tuple(self.modules_to_not_convert)
        if self.block_size is not None:
            self.block_size = (int(self.block_size[0]), int(self.block_size[1]))

    def to_hf(self, name: str) -> str:
        return _rename(name, self.renames, to_checkpoint=True)

    def from_hf_key(self, key: str) -> str:
        """The model name of a checkpoint data key (the inverse of :meth:`to_hf`)."""
        return _rename(key, self._reverse, to_checkpoint=False)

    def from_hf(self, name: str) -> TensorSource:
        key = self.to_hf(name)
        if key not in self.checkpoint or not fp8.is_fp8(self.checkpoint.info(key).dtype):
            return TensorSource(key)
        if self._never_converted(name):
            raise CheckpointError(
                f"tensor is FP8 but its module is listed in quantization_config.modules_to_not_convert "
                f"({', '.join(self.modules_to_not_convert)}); config and checkpoint disagree",
                path=self.checkpoint.info(key).file,
                key=key,
            )
        return TensorSource(
            key,
            scale_key=self._scale_key(key),
            block_size=self.block_size,
            dropped_keys=tuple(k for k in fp8.activation_key_candidates(key) if k in self.checkpoint),
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
        return "per-tensor" if self.block_size is None else f"block {self.block_size[0]}x{self.block_size[1]}"

    def _scale_key(self, key: str) -> str:
        present = [k for k in fp8.scale_key_candidates(key) if k in self.checkpoint]
        if not present:
            raise ScaleError(
                f"FP8 weight has no scale (looked for {', '.join(fp8.scale_key_candidates(key))})",
                path=self.checkpoint.info(key).file,
                key=key,
            )
        if len(present) > 1:
            raise ScaleError(
                f"FP8 weight has several scales ({', '.join(present)}); which one applies is ambiguous",
                key=key,
            )
        self._seen_scale_names.add(present[0].rsplit(".", 1)[-1])
        return present[0]

    def _never_converted(self, name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in self.modules_to_not_convert)


def fp8_adapter_for(
    config: Any, checkpoint: Checkpoint, *, renames: Sequence[PrefixRename] = (), layout: str = "runtime"
) -> Fp8StateDictAdapter:
    """The FP8 adapter a config's ``quantization_config`` asks for (block size, modules never converted).

    An unquantized config gets the same adapter with nothing to dequantize; an unsupported quantization
    method raises :class:`~automodel_plugins.errors.UnsupportedQuantizationError` naming the field.
    """
    from automodel_plugins.quantization import parse_fp8_quantization

    quantization = parse_fp8_quantization(config)
    return Fp8StateDictAdapter(
        checkpoint,
        renames=renames,
        block_size=quantization.weight_block_size if quantization else None,
        modules_to_not_convert=quantization.modules_to_not_convert if quantization else (),
        layout=layout,
    )
