"""The progress bar every long-running stage shows (loading, saving, ``convert``), behind one switch.

A bar appears only on a terminal, after a second, never under pytest, and never when
``AUTOMODEL_PLUGINS_PROGRESS=0`` or ``progress=False``; ``progress=True`` forces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["PROGRESS_ENV", "progress_bar", "progress_enabled"]

PROGRESS_ENV = "AUTOMODEL_PLUGINS_PROGRESS"
T = TypeVar("T")


def progress_enabled(enabled: bool | None) -> bool:
    """``enabled`` when given, else on for an interactive terminal outside pytest unless the switch is off."""
    if enabled is not None:
        return enabled
    return (
        os.environ.get(PROGRESS_ENV, "1") != "0"
        and "PYTEST_CURRENT_TEST" not in os.environ
        and sys.stderr.isatty()
    )


def progress_bar(
    items: Iterable[T], *, enabled: bool | None, desc: str, total: int | None = None, unit: str = "tensor"
) -> Iterator[T] | Iterable[T]:
    """``items`` wrapped in a tqdm bar when :func:`progress_enabled`, else as they are."""
    if not progress_enabled(enabled):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, delay=1.0, leave=False)
