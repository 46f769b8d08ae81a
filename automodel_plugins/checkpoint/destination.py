"""Writing a checkpoint directory safely: into a temporary directory beside the destination, renamed at the end.

A save that stops part way (an exception, a full disk, a killed process) leaves no directory that loads as a
checkpoint and never touches an existing one: files go into ``<parent>/.<name>.tmp-XXXX``, whose
``config.json`` is written last, and only a complete directory is renamed onto ``<parent>/<name>``. A crash
can leave that hidden temporary directory behind (safe to delete); an exception removes it.

Refused up front, with a :class:`~automodel_plugins.errors.DestinationError` naming the path: a destination
equal to or inside a protected directory (the checkpoint being read), or containing it; a file; a non-empty
directory unless ``overwrite``; a parent that cannot be written. With ``overwrite`` the old directory is
swapped out atomically where the system can (``renameat2(RENAME_EXCHANGE)`` on Linux), else it is renamed
aside first; either way it is deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from automodel_plugins.errors import DestinationError, SaveWriteError

__all__ = ["Destination", "check_destination"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_destination(dest: str | Path, *, overwrite: bool, protected: Iterable[Path] = ()) -> Path:
    """The absolute destination path, after refusing what cannot be written there (see the module docs)."""
    final = Path(dest).expanduser().absolute()
    final = final.parent.resolve() / final.name if final.name else final.resolve()
    resolved = final.resolve()
    for root in protected:
        root = Path(root).resolve()
        if resolved == root or resolved.is_relative_to(root):
            raise DestinationError(f"the destination is inside the source checkpoint {root}", path=final)
        if root.is_relative_to(resolved):
            raise DestinationError(f"the destination contains the source checkpoint {root}", path=final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise DestinationError("the destination exists and is not a directory", path=final)
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise DestinationError(
            "the destination is a non-empty directory (overwrite=True, or --overwrite, replaces it)",
            path=final,
        )
    return final


@dataclass
class Destination:
    """A checkpoint directory being written: files go into :attr:`staging`, :meth:`commit` puts it in place."""

    final: Path
    staging: Path
    overwrite: bool = False

    @classmethod
    def prepare(cls, dest: str | Path, *, overwrite: bool, protected: Iterable[Path] = ()) -> Destination:
        """Check ``dest`` and create the temporary directory beside it (and any missing parent)."""
        final = check_destination(dest, overwrite=overwrite, protected=protected)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        except OSError as exc:
            raise DestinationError(
                f"cannot create the checkpoint here: {exc.strerror or exc}", path=final
            ) from exc
        return cls(final, staging, overwrite)

    def abort(self) -> None:
        """Remove the temporary directory and everything in it."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self, *, sync: bool = True) -> None:
        """Sync the temporary directory (``sync``) and rename it onto the destination (replacing an old one)."""
        try:
            if sync:
                _sync_directory(self.staging)
            if self.final.exists() and any(self.final.iterdir()):
                if not self.overwrite:
                    raise OSError(
                        errno.ENOTEMPTY, "the destination was filled while the checkpoint was written"
                    )
                self._replace()
            else:
                os.replace(self.staging, self.final)  # onto nothing, or onto an empty directory
            if sync:
                _sync_directory(self.final.parent)
        except OSError as exc:
            self.abort()
            raise SaveWriteError(
                f"cannot move the finished checkpoint into place: {exc.strerror or exc}",
                path=self.final,
                errno=exc.errno,
            ) from exc

    def _replace(self) -> None:
        """Swap the new directory with the old one (atomically where supported), then delete the old one."""
        if _exchange(self.staging, self.final):
            shutil.rmtree(self.staging, ignore_errors=True)  # now holds the old checkpoint
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
        os.replace(self.final, aside)
        try:
            os.replace(self.staging, self.final)
        except OSError:
            os.replace(aside, self.final)
            raise
        shutil.rmtree(aside, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """``renameat2(first, second, RENAME_EXCHANGE)``; False where the system or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
