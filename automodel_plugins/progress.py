"""One switch for every progress bar the host shows: tensors streamed in or written out, and hub downloads.

``progress=None`` (the default of every entry point) means "on for a person at a terminal": off when
``AUTOMODEL_PLUGINS_PROGRESS=0``, under pytest, or when stderr is not a terminal; ``progress=True`` forces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["PROGRESS_ENV", "progress_bar", "progress_enabled"]

PROGRESS_ENV = "AUTOMODEL_PLUGINS_PROGRESS"
T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    """Whether to show bars: ``progress`` when given, else the automatic rule above."""
    if progress is not None:
        return bool(progress)
    return (
        os.environ.get(PROGRESS_ENV, "1") != "0"
        and "PYTEST_CURRENT_TEST" not in os.environ
        and sys.stderr.isatty()
    )


def progress_bar(
    items: Iterable[T], *, enabled: bool | None, desc: str, total: int | None = None, unit: str = "tensor"
) -> Iterator[T] | Iterable[T]:
    """``items`` in a tqdm bar that appears after a second when :func:`progress_enabled`, else as they are."""
    if not progress_enabled(enabled):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, delay=1.0, leave=False)
