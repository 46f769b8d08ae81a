"""Throwaway plugin modules for the registry and CLI tests.

Each module is importable in-process (``import fake_plugins.mistral3_claimer``) and its source can be "installed"
as a fake distribution under any module name with :func:`source`.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def source(module: str) -> str:
    """The text of ``fake_plugins/<module>.py``, to write into a fake distribution."""
    return (HERE / f"{module}.py").read_text()
