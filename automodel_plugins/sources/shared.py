"""Work the ranks of a ``torch.distributed`` job share: one rank does it, the others wait and use its result.

Downloads from the hub go through here so that the ranks of one machine make one download (the lowest rank of
each machine fetches into the shared cache while the others wait, then read the cache without a request), and
so that facts every rank needs (the commit a branch points at, remote safetensors headers) are asked for once.
Every rank must make the same calls in the same order, as they do inside ``from_pretrained``, ``build_model``
and ``load_weights``; what each rank asks for may differ (a pipeline stage needs only its shards).

The waiting happens on a gloo group of its own with a long timeout (``AUTOMODEL_PLUGINS_DOWNLOAD_TIMEOUT``,
seconds, default 4 hours): a 100 GB download outlasts the default collective timeout of a training job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

__all__ = ["TIMEOUT_ENV", "distributed", "shared"]

T = TypeVar("T")

TIMEOUT_ENV = "AUTOMODEL_PLUGINS_DOWNLOAD_TIMEOUT"
_DEFAULT_TIMEOUT_S = 4 * 3600
_groups: dict[int, Any] = {}


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialized ``torch.distributed`` job."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shared(
    requests: Sequence[str],
    work: Callable[[list[str]], T],
    *,
    scope: str | None,
    failure: Callable[[int, str, str], Exception],
) -> T:
    """Run ``work`` once per group of ranks and hand every rank its group's result.

    Each rank passes what it needs (``requests``). Ranks with the same ``scope`` (e.g. host and cache
    directory) form a group, ``None`` putting every rank in one; the lowest rank of each group runs ``work`` on
    the union of its group's requests while the others wait. An exception in any group's ``work`` is raised on
    every rank: the rank that failed raises its own, the others ``failure(rank, class name, message)``.
    """
    import torch.distributed as dist

    group = _wait_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    asked: list[Any] = [None] * world
    dist.all_gather_object(asked, (scope, list(requests)), group=group)
    members = [r for r, (their_scope, _) in enumerate(asked) if their_scope == scope]
    leader = members[0]
    outcome: tuple[str, Any, str] | None = None
    error: Exception | None = None
    if rank == leader:
        union = sorted({name for member in members for name in asked[member][1]})
        try:
            outcome = ("ok", work(union), "")
        except Exception as exc:
            error = exc
            outcome = ("error", type(exc).__name__, str(exc))
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, outcome, group=group)
    if error is not None:
        raise error
    for failed, (status, kind, message) in ((r, o) for r, o in enumerate(outcomes) if o is not None):
        if status == "error":
            raise failure(failed, kind, message)
    return outcomes[leader][1]


def _wait_group() -> Any:
    """A gloo group over every rank with the long timeout, made once (collectively) on first use."""
    import torch.distributed as dist

    key = id(dist.group.WORLD)
    group = _groups.get(key)
    if group is None:
        seconds = float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S))
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        _groups[key] = group
    return group
