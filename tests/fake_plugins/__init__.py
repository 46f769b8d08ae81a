"""Throwaway plugin modules for the registry and CLI tests.

Each module is importable in-process (``import fake_plugins.mistral3_claimer``) and its source can be "installed"
as a fake distribution under any module name with :func:`source`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent


def source(module: str) -> str:
    """The text of ``fake_plugins/<module>.py``, to write into a fake distribution."""
    return (HERE / f"{module}.py").read_text()


def installed(distribution: str) -> bool:
    """Whether ``distribution`` is really installed in this environment (a plugin the tests may use as is)."""
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True
