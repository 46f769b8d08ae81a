"""One switch for every progress bar the host shows: tensors streamed in, and files downloaded from the hub.

``progress=None`` (the default of every entry point) means "on for a person at a terminal": off when
``AUTOMODEL_PLUGINS_PROGRESS=0``, under pytest, or when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys

__all__ = ["PROGRESS_ENV", "progress_enabled"]

PROGRESS_ENV = "AUTOMODEL_PLUGINS_PROGRESS"


def progress_enabled(progress: bool | None) -> bool:
    """Whether to show bars: ``progress`` when given, else the automatic rule above."""
    if progress is not None:
        return bool(progress)
    return (
        os.environ.get(PROGRESS_ENV, "1") != "0"
        and "PYTEST_CURRENT_TEST" not in os.environ
        and sys.stderr.isatty()
    )
