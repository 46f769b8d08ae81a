"""What a load did (:class:`LoadReport`): counted by the streaming loader, attached to the model's composition."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoadReport"]


@dataclass
class LoadReport:
    """What a load did; attached to the model's composition record.

    ``used_in_place`` counts tensors stored in the dtype the model holds (memory-mapped when assigned whole
    on CPU, copied into an already materialized model); ``kept_fp8`` the FP8 weights held as FP8 by
    FP8-resident layers and experts; ``unused_keys_allowed`` the checkpoint keys a pipeline stage left to the
    other stages. ``assembled`` counts the tensors put together from pieces (also counted by how:
    ``dequantized`` when FP8 pieces were among them, ``kept_fp8`` for resident experts, else ``converted``),
    ``pieces`` the pieces read for them.
    """

    tensors: int = 0
    dequantized: int = 0
    kept_fp8: int = 0
    used_in_place: int = 0
    converted: int = 0
    assembled: int = 0
    pieces: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    unused_keys_allowed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
