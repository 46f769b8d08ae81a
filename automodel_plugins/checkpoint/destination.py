"""Writing a checkpoint directory safely: into a temporary directory beside the destination, renamed at the end.

A save that stops part way (an exception, a full disk, a killed process) leaves no directory that loads as a
checkpoint and never touches an existing one: files go into ``<parent>/.<name>.tmp-XXXXXXXX`` (a shorter,
deterministic name with a digest when that would exceed the file system's name limit), whose ``config.json``
is written last, and only a complete directory is renamed onto ``<parent>/<name>``. An exception removes the
temporary directory; a crash can leave it behind, and the next save of the same destination removes it: only a
directory named so *and* holding this library's marker file (:data:`MARKER_NAME`, which records the process
that made it), and only once that process is gone. A directory without the marker is never deleted.

Refused up front, with a :class:`~automodel_plugins.errors.DestinationError` naming the path: an empty path
(``""`` would name the working directory), a NUL byte, a name longer than the file system allows; a
destination equal to, inside, or containing a protected directory (the checkpoint the model was loaded from:
by its real path and by its device and inode, recorded at load time, whatever state it is in now); a file; a
mount point (it cannot be renamed); a non-empty directory unless ``overwrite``, and with ``overwrite`` a
non-empty directory that is not a checkpoint (no ``config.json`` / ``params.json`` beside ``*.safetensors``);
a parent that cannot be written. With ``overwrite`` the old directory is swapped out atomically where the
system can (``renameat2(RENAME_EXCHANGE)`` on Linux). Elsewhere it is renamed aside to
``.<name>.old-XXXXXXXX`` (marked like a temporary directory) and the new one renamed into place: a process
killed between those two renames leaves the destination missing and the old checkpoint aside, complete, and
the next save of that destination renames it back before anything else. Either way the old directory is
deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from automodel_plugins.errors import DestinationError, SaveWriteError

__all__ = ["MARKER_NAME", "Destination", "ProtectedDirectory", "check_destination"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

MARKER_NAME = ".automodel-plugins-partial"
"""The file this library writes into each temporary sibling it makes: what makes a sibling its own to delete."""
_STAGING = ".tmp-"
_ASIDE = ".old-"
_RANDOM_CHARS = 8  # what tempfile.mkdtemp appends to the prefix
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096
_CHECKPOINT_CONFIGS = ("config.json", "params.json")
_SHOWN_ENTRIES = 5


@dataclass(frozen=True)
class ProtectedDirectory:
    """A directory no save may write over, inside or around (the source checkpoint), as it was when recorded:
    its real path, and its device and inode, which still name it after it is renamed or changed."""

    path: Path
    device: int | None = None
    inode: int | None = None

    @classmethod
    def of(cls, directory: str | Path) -> ProtectedDirectory:
        real = Path(directory).resolve()
        try:
            stat = os.stat(real)
        except OSError:
            return cls(real)
        return cls(real, stat.st_dev, stat.st_ino)

    def same_as(self, stat: os.stat_result) -> bool:
        """Whether ``stat`` is of this very directory (its device and inode)."""
        return self.device is not None and (stat.st_dev, stat.st_ino) == (self.device, self.inode)


def check_destination(
    dest: str | Path, *, overwrite: bool, protected: Iterable[Path | ProtectedDirectory] = ()
) -> Path:
    """The absolute destination path, after refusing what cannot be written there (see the module docs)."""
    roots = [
        root if isinstance(root, ProtectedDirectory) else ProtectedDirectory.of(root) for root in protected
    ]
    final = _destination_path(dest, roots)
    _check_existing(final, overwrite=overwrite, roots=roots)
    return final


def _destination_path(dest: str | Path, roots: list[ProtectedDirectory]) -> Path:
    """The absolute path ``dest`` names, refused when it is no usable name or the source is at, in or under it."""
    raw = os.fspath(dest)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw.strip():
        raise DestinationError(
            f"the destination {raw!r} is empty (it would name the working directory): pass a directory path"
        )
    if "\0" in raw:
        raise DestinationError(f"the destination {raw!r} contains a NUL byte: no file can have such a name")
    try:
        final = Path(raw).expanduser().absolute()
        _check_name_lengths(final)
        final = final.parent.resolve() / final.name if final.name else final.resolve()
        resolved = final.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop, an unknown ~user
        raise DestinationError(f"the destination {raw!r} cannot be resolved: {exc}") from exc
    for root in roots:
        if resolved == root.path:
            raise DestinationError(f"the destination is the source checkpoint {root.path}", path=final)
        if resolved.is_relative_to(root.path):
            raise DestinationError(f"the destination is inside the source checkpoint {root.path}", path=final)
        if root.path.is_relative_to(resolved):
            raise DestinationError(f"the destination contains the source checkpoint {root.path}", path=final)
        for at in (resolved, *resolved.parents):
            with contextlib.suppress(OSError):
                if root.same_as(os.stat(at)):
                    where = "is" if at == resolved else "is inside"
                    raise DestinationError(
                        f"the destination {where} the source checkpoint {root.path} (the same directory by device "
                        f"and inode{'' if at == resolved else ': ' + str(at)})",
                        path=final,
                    )
    return final


def _check_name_lengths(final: Path) -> None:
    """Each component within the file system's name limit, the whole within its path limit (else the OS says
    ``ENAMETOOLONG`` from deep inside the save)."""
    name_max, path_max = _limits(final)
    for part in final.parts[1:]:
        size = len(os.fsencode(part))
        if size > name_max:
            raise DestinationError(
                f"the destination's path holds a name of {size} bytes ({part[:24]!r}...), over the file "
                f"system's limit of {name_max} bytes"
            )
    size = len(os.fsencode(str(final)))
    if size > path_max:
        raise DestinationError(
            f"the destination path is {size} bytes, over the system's limit of {path_max} bytes"
        )


def _limits(path: Path) -> tuple[int, int]:
    """``NAME_MAX`` and ``PATH_MAX`` where ``path`` (or its nearest existing ancestor) is."""
    existing = next((p for p in (path, *path.parents) if _exists(p)), Path(path.anchor or "/"))
    limits = []
    for name, default in (("PC_NAME_MAX", _DEFAULT_NAME_MAX), ("PC_PATH_MAX", _DEFAULT_PATH_MAX)):
        try:
            limits.append(int(os.pathconf(existing, name)))
        except (OSError, ValueError):
            limits.append(default)
    return limits[0], limits[1]


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _check_existing(final: Path, *, overwrite: bool, roots: list[ProtectedDirectory]) -> None:
    """Refuse what is already at ``final`` and cannot be replaced (see the module docs)."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise DestinationError("the destination exists and is not a directory", path=final)
    if not final.is_dir():
        return
    if is_mount_point(final):
        raise DestinationError(
            "the destination is a mount point: a checkpoint is put in place by renaming a directory onto it, "
            "which a mount point cannot be; save into a new directory inside it",
            path=final,
        )
    try:
        entries = sorted(os.scandir(final), key=lambda entry: entry.name)
    except OSError as exc:
        raise DestinationError(
            f"the destination cannot be listed: {exc.strerror or exc}", path=final
        ) from exc
    if not entries:
        return
    if not overwrite:
        raise DestinationError(
            "the destination is a non-empty directory (overwrite=True, or --overwrite, replaces it)",
            path=final,
        )
    _refuse_non_checkpoint(final, entries)
    # What the replacement deletes must not hold the source (moved there since the load).
    for directory, subdirectories, _ in os.walk(final):
        for name in subdirectories:
            with contextlib.suppress(OSError):
                stat = os.stat(os.path.join(directory, name), follow_symlinks=False)
                for root in roots:
                    if root.same_as(stat):
                        raise DestinationError(
                            f"the destination contains the source checkpoint {root.path} (now at "
                            f"{os.path.join(directory, name)}, the same directory by device and inode)",
                            path=final,
                        )


def _refuse_non_checkpoint(final: Path, entries: list[os.DirEntry]) -> None:
    """``overwrite`` replaces a checkpoint directory only (a config beside safetensors weights), never a
    directory of other things (``""`` or ``"."`` naming a project, a home directory)."""
    names = {entry.name for entry in entries}
    has_weights = any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names)
    if has_weights and names.intersection(_CHECKPOINT_CONFIGS):
        return
    shown = [entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "") for entry in entries]
    listing = ", ".join(shown[:_SHOWN_ENTRIES]) + (
        f", ... ({len(shown)} entries)" if len(shown) > _SHOWN_ENTRIES else ""
    )
    raise DestinationError(
        f"overwrite replaces a checkpoint directory, and this one is not a checkpoint (no config.json or "
        f"params.json beside *.safetensors weights); it holds: {listing}. Remove it yourself or choose "
        "another destination",
        path=final,
    )


def is_mount_point(path: Path) -> bool:
    """Whether ``path`` is where a file system is mounted (its device differs from its parent's)."""
    try:
        return _device(path) != _device(path.parent) or os.path.ismount(path)
    except OSError:
        return False


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def sibling_prefix(name: str, kind: str, name_max: int = _DEFAULT_NAME_MAX) -> str:
    """The prefix of the temporary siblings of destination ``name`` (``kind``: ``.tmp-`` or ``.old-``):
    ``.<name><kind>``, or, when that plus the random part would not fit ``name_max`` bytes, the name cut short
    followed by a digest of the whole name (the same for the same name, so stale ones are found again)."""
    prefix = f".{name}{kind}"
    if len(os.fsencode(prefix)) + _RANDOM_CHARS <= name_max:
        return prefix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = name_max - _RANDOM_CHARS - len(kind) - len(digest) - 2  # "." and "~"
    short = name
    while len(os.fsencode(short)) > room:
        short = short[:-1]
    return f".{short}~{digest}{kind}"


@dataclass
class Destination:
    """A checkpoint directory being written: files go into :attr:`staging`, :meth:`commit` puts it in place."""

    final: Path
    staging: Path
    overwrite: bool = False

    @classmethod
    def prepare(
        cls, dest: str | Path, *, overwrite: bool, protected: Iterable[Path | ProtectedDirectory] = ()
    ) -> Destination:
        """Check ``dest``, clear what a crashed save of it left beside it, and create the (marked) temporary
        directory beside it (and any missing parent)."""
        roots = [r if isinstance(r, ProtectedDirectory) else ProtectedDirectory.of(r) for r in protected]
        final = _destination_path(dest, roots)
        if final.parent.is_dir():
            recover_siblings(final)
        _check_existing(final, overwrite=overwrite, roots=roots)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            prefix = sibling_prefix(final.name, _STAGING, _limits(final.parent)[0])
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        except OSError as exc:
            raise DestinationError(
                f"cannot create the checkpoint here: {exc.strerror or exc}", path=final
            ) from exc
        try:
            _write_marker(staging, final.name, "staging")
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
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
                _refuse_non_checkpoint(self.final, sorted(os.scandir(self.final), key=lambda e: e.name))
                self._replace()
            else:
                os.replace(self.staging, self.final)  # onto nothing, or onto an empty directory
            (self.final / MARKER_NAME).unlink(missing_ok=True)  # in place now: no longer temporary
            if sync:
                _sync_directory(self.final.parent)
        except DestinationError:
            self.abort()
            raise
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
            with contextlib.suppress(OSError):  # the old checkpoint, now temporary: a crash leaves it marked
                _write_marker(self.staging, self.final.name, "old")
            remove_marked_tree(self.staging)
            return
        prefix = sibling_prefix(self.final.name, _ASIDE, _limits(self.final.parent)[0])
        aside = Path(tempfile.mkdtemp(prefix=prefix, dir=self.final.parent))
        os.replace(self.final, aside)  # the destination is missing from here ...
        try:
            _write_marker(aside, self.final.name, "old")
            os.replace(self.staging, self.final)  # ... to here (a crash between: the next save restores it)
        except OSError:
            os.replace(aside, self.final)
            (self.final / MARKER_NAME).unlink(missing_ok=True)
            raise
        remove_marked_tree(aside)


# --- what a crashed save left beside its destination ---------------------------------------------------------


def _write_marker(directory: Path, destination: str, role: str) -> None:
    """Mark ``directory`` as this process's temporary sibling of ``destination``."""
    owner = {"destination": destination, "role": role, "pid": os.getpid(), "host": socket.gethostname()}
    boot = _boot_id()
    if boot is not None:
        owner["boot"] = boot
    (directory / MARKER_NAME).write_text(json.dumps(owner), encoding="utf-8")


def _read_marker(directory: Path) -> dict | None:
    """The marker's record, or ``None`` when there is no marker (a plain file of a few hundred bytes)."""
    marker = directory / MARKER_NAME
    try:
        if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > 4096:
            return None
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner_gone(record: dict) -> bool | None:
    """Whether the process that made a marked directory has ended: ``None`` when that cannot be known here
    (another host)."""
    if record.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot is not None and record.get("boot") not in (None, boot):
        return True  # made before the machine restarted
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def recover_siblings(final: Path) -> list[Path]:
    """Clear what a crashed save of ``final`` left beside it: a marked temporary directory whose process has
    ended is deleted; a marked old checkpoint renamed aside is renamed back when ``final`` is missing (the crash
    came between the two renames of a replacement), else deleted. Returns what was removed or restored.

    Only directories named as this library names them *and* holding its marker are touched; one whose maker
    may still run (this host, a live process) or cannot be checked (another host) is left, with a warning
    for the latter.
    """
    name_max = _limits(final.parent)[0]
    prefixes = {kind: sibling_prefix(final.name, kind, name_max) for kind in (_ASIDE, _STAGING)}
    handled: list[Path] = []
    try:
        siblings = sorted(os.scandir(final.parent), key=lambda entry: entry.name)
    except OSError:
        return handled
    for kind, prefix in prefixes.items():  # asides first: a restored old checkpoint is the destination again
        for entry in siblings:
            if not entry.name.startswith(prefix) or len(entry.name) != len(prefix) + _RANDOM_CHARS:
                continue
            path = Path(entry.path)
            if not entry.is_dir(follow_symlinks=False) or not _exists(path):
                continue
            record = _read_marker(path)
            if record is None or record.get("destination") != final.name:
                continue
            gone = _owner_gone(record)
            if gone is None:
                warnings.warn(
                    f"{path} was left by a save on host {record.get('host')!r} (pid {record.get('pid')}); "
                    "it is kept while that save may be running: delete it once it is not",
                    UserWarning,
                    stacklevel=4,
                )
                continue
            if not gone:
                continue
            if kind == _ASIDE and not _exists(final):
                try:
                    os.rename(path, final)
                    (final / MARKER_NAME).unlink(missing_ok=True)
                except OSError as exc:
                    warnings.warn(
                        f"{final} is missing and its previous checkpoint is beside it in {path.name}, left by a "
                        f"save killed half way through replacing it; it could not be renamed back ({exc})",
                        UserWarning,
                        stacklevel=4,
                    )
                    continue
                warnings.warn(
                    f"{final} was missing and its previous checkpoint was beside it in {path.name}, left by a save "
                    "killed half way through replacing it: renamed back",
                    UserWarning,
                    stacklevel=4,
                )
            else:
                remove_marked_tree(path)
            handled.append(path)
    return handled


def remove_marked_tree(directory: Path) -> None:
    """Delete a marked directory, its marker last: a crash half way leaves it marked, for the next save."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name == MARKER_NAME:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.unlink(directory / MARKER_NAME)
    shutil.rmtree(directory, ignore_errors=True)


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
