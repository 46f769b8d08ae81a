"""The adapter contract: where each model tensor lives in a checkpoint, and the key it has there.

Modelled on torchtitan's ``StateDictAdapter`` (``from_hf`` / ``to_hf``), but per tensor instead of per state
dict, so the host can stream: it asks the adapter where one model tensor lives, reads that tensor (or only the
slice a rank owns), dequantizes it, and moves on. Nothing here reads tensor data; checkpoint headers suffice.

Most model tensors are one checkpoint tensor (a :class:`TensorSource` with a key). Some are assembled from
several (a mixture-of-experts layer's fused ``experts.gate_up_proj [E, 2I, H]`` from one 2-D FP8 tensor per
expert and projection, each with its own scale) or from a transformed one (a fused tensor stored transposed):
such a source lists its :class:`Piece` objects, each a checkpoint tensor filling one box of the model tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Box", "Piece", "StateDictAdapter", "TensorSource", "key_view"]

Box = tuple[tuple[int, int], ...]
"""A region of a tensor: ``(start, stop)`` per dim."""


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor that fills the ``box`` of a model tensor (``None``: all of it).

    The stored tensor holds the box's values: the box's shape with its leading size-1 dims left out until the
    stored tensor's rank is reached (expert ``e``'s ``[I, H]`` gate fills ``((e, e+1), (0, I), (0, H))`` of a
    ``[E, 2I, H]`` tensor), and, with ``transposed``, its last two dims swapped. ``scale_key`` set means the
    piece is FP8 data times that scale (one per tensor, or one per ``block_size`` block of each 2-D matrix).
    ``rope_heads`` set means the stored 2-D matrix's rows are in Mistral's interleaved rotary order, per head
    of ``rows // rope_heads`` rows (native q/k projections): read, they are permuted into transformers'
    half-split order (``permute_for_rope`` of transformers' Mistral converters); written, permuted back.
    """

    key: str
    box: Box | None = None
    scale_key: str | None = None
    block_size: tuple[int, int] | None = None
    transposed: bool = False
    dropped_keys: tuple[str, ...] = ()
    rope_heads: int | None = None

    @property
    def is_fp8(self) -> bool:
        return self.scale_key is not None

    @property
    def keys(self) -> tuple[str, ...]:
        """Every checkpoint key this piece accounts for."""
        return (self.key,) + ((self.scale_key,) if self.scale_key else ()) + self.dropped_keys

    def box_in(self, shape: Sequence[int]) -> Box:
        """The piece's box in a model tensor of ``shape``."""
        return self.box if self.box is not None else tuple((0, size) for size in shape)

    def stored_source(self) -> TensorSource:
        """The stored tensor alone, as a one-to-one source: what reading the piece reads."""
        return TensorSource(self.key, self.scale_key, self.block_size, self.dropped_keys)


@dataclass(frozen=True)
class TensorSource:
    """Where one model tensor's value lives in the checkpoint and how it is stored.

    ``scale_key`` set means ``key`` holds FP8 data to be multiplied by that scale (one per tensor when
    ``block_size`` is None, else one per ``block_size`` block). ``dropped_keys`` are read by nobody but are
    accounted for, so that strict key accounting still catches every key nobody consumed.

    ``pieces`` (made with :meth:`assembled`): the tensor is assembled from these checkpoint tensors, each
    filling its box and scaled with its own scale; ``key`` is then the first piece's, ``dropped_keys`` all of
    theirs, and ``scale_key`` / ``block_size`` are unset. A source without pieces is one piece covering the
    whole tensor (:meth:`parts`).
    """

    key: str
    scale_key: str | None = None
    block_size: tuple[int, int] | None = None
    dropped_keys: tuple[str, ...] = ()
    pieces: tuple[Piece, ...] = ()

    def __post_init__(self) -> None:
        if self.pieces and (self.scale_key is not None or self.block_size is not None):
            raise ValueError(
                "a TensorSource assembled from pieces has no scale of its own: each piece has one"
            )

    @classmethod
    def assembled(cls, pieces: Iterable[Piece]) -> TensorSource:
        """The model tensor assembled from ``pieces`` (their boxes must tile it exactly once)."""
        pieces = tuple(pieces)
        if not pieces:
            raise ValueError("a TensorSource is assembled from at least one piece")
        dropped = tuple(key for piece in pieces for key in piece.dropped_keys)
        return cls(pieces[0].key, dropped_keys=dropped, pieces=pieces)

    @property
    def is_assembled(self) -> bool:
        """Whether the value is put together from pieces (several tensors, or a transformed one)."""
        return bool(self.pieces)

    def parts(self) -> tuple[Piece, ...]:
        """The pieces; for a one-to-one source, one piece covering the whole tensor."""
        if self.pieces:
            return self.pieces
        return (Piece(self.key, None, self.scale_key, self.block_size, False, self.dropped_keys),)

    @property
    def data_keys(self) -> tuple[str, ...]:
        """The checkpoint keys holding this tensor's values (one per piece)."""
        return tuple(piece.key for piece in self.parts())

    @property
    def keys(self) -> tuple[str, ...]:
        """Every checkpoint key this tensor accounts for."""
        if self.pieces:
            return tuple(key for piece in self.pieces for key in piece.keys)
        return (self.key,) + ((self.scale_key,) if self.scale_key else ()) + self.dropped_keys

    @property
    def is_fp8(self) -> bool:
        """FP8 data is (part of) the value: the source's own scale, or any piece's."""
        return self.scale_key is not None or any(piece.is_fp8 for piece in self.pieces)


def key_view(checkpoint: Any) -> Collection[str]:
    """``checkpoint.stored_keys`` for a :class:`~automodel_plugins.checkpoint.Checkpoint` (``in`` is one dict
    lookup, no method call), else the object itself: adapters are also asked with stand-ins that only answer
    ``in`` and iterate (a native layout holding no tensor yet)."""
    return getattr(checkpoint, "stored_keys", checkpoint)


class StateDictAdapter(ABC):
    """Maps model tensor names to checkpoint sources (``from_hf``) and back (``to_hf``)."""

    @abstractmethod
    def from_hf(self, name: str) -> TensorSource:
        """Where the model tensor ``name`` (a ``state_dict`` key of the stock model) lives in the checkpoint."""

    @abstractmethod
    def to_hf(self, name: str) -> str:
        """The checkpoint key the model tensor ``name`` is stored under in this checkpoint's layout (for a
        tensor assembled from pieces: the name its values would have as one tensor in that layout)."""

    def to_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a model state dict into this checkpoint's layout (values untouched, not re-quantized)."""
        return {self.to_hf(name): tensor for name, tensor in state_dict.items()}

    def describe(self) -> dict[str, Any]:
        """What this adapter does, for ``inspect`` and the load record."""
        return {"adapter": type(self).__name__}
