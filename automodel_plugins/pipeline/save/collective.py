"""The few collectives a sharded save needs, and the rule that keeps every rank in step when one fails.

Every rank calls ``save_pretrained`` and so every method here, in the same order. A step that can fail on one
rank (creating the temporary directory, writing a full disk) ends with :meth:`Ranks.agree`: every rank learns
whether any rank failed, and all raise, so no rank waits forever in the next collective. Outside a distributed
run (or with one rank) every method is local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from automodel_plugins.errors import SaveError, SaveWriteError

__all__ = ["Ranks"]


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` ranks of the default process group."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, by rank (a picklable object)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None, step: str) -> None:
        """End a step every rank ran: re-raise this rank's own ``error``; when another rank failed, raise the
        same kind of error where it is one of this package's save errors (else :class:`SaveWriteError`),
        naming that rank; return when none failed."""
        summary = None if error is None else (type(error).__name__, str(error))
        outcomes = self.gather(summary)
        if error is not None:
            raise error
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if not failed:
            return
        rank, (kind, message) = failed[0]
        error_class = _SAVE_ERRORS.get(kind, SaveWriteError)
        raise error_class(f"{step} failed on rank {rank}: {message}")


_SAVE_ERRORS = {cls.__name__: cls for cls in (SaveError, *_subclasses(SaveError))}
