"""The adapter contract: where each model tensor lives in a checkpoint, and the key it has there.

Modelled on torchtitan's ``StateDictAdapter`` (``from_hf`` / ``to_hf``), but per tensor instead of per state
dict, so the host can stream: it asks the adapter where one model tensor lives, reads that tensor (or only the
slice a rank owns), dequantizes it, and moves on. Nothing here reads tensor data; checkpoint headers suffice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["StateDictAdapter", "TensorSource"]


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
