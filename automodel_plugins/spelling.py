"""How an error's advice names an option: as the Python argument (``revision=``) from Python, as the flag
(``--revision``) from the command line, so users are told what to type where they are.

The CLI runs its commands under :func:`cli_spelling`; messages built meanwhile (also in worker threads started
with a copy of the context) spell options through :func:`option`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["cli_spelling", "in_cli", "option"]

_CLI: ContextVar[bool] = ContextVar("automodel_plugins_cli_spelling", default=False)

FLAGS = {
    "revision": "--revision",
    "cache_dir": "--cache-dir",
    "local_files_only": "--local-files-only",
}
"""Python arguments and the CLI flags that set them (a token has no flag: ``HF_TOKEN`` or ``hf auth login``)."""


def in_cli() -> bool:
    """Whether the current call came from the command line."""
    return _CLI.get()


def option(name: str, value: str | None = None) -> str:
    """``name`` as the caller spells it: ``revision=`` / ``local_files_only=True`` in Python, ``--revision`` /
    ``--local-files-only`` on the command line (``value`` is shown in Python only; flags take it after them)."""
    if in_cli() and name in FLAGS:
        return FLAGS[name]
    return f"{name}={value if value is not None else ''}"


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Spell options as CLI flags in the messages built inside."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)
