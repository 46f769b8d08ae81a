"""One safetensors file, opened once: its header, every read of its data and its memory map go through that one
open file.

Checkpoints are updated the safe way: a complete new file is written beside the old one and renamed over it.
A reader that reopened the path for each read would mix the two versions (the first header's offsets applied to
the second file's bytes); reading only through the file descriptor the header was parsed from, a load sees exactly
the file it started with, however often the path is replaced meanwhile. A file rewritten in place (same file,
new size or modification time) cannot be read consistently at all, and :meth:`ShardFile.check_unchanged` refuses
it once the load has read it.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from pathlib import Path

import torch

from automodel_plugins.checkpoint.header import Header, HeaderEntry, parse_header, pread_exactly
from automodel_plugins.errors import CheckpointError, CorruptCheckpointError
from automodel_plugins.sources.resolve import not_a_file

__all__ = ["ShardFile"]


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An open descriptor on the regular file ``path`` and its stat, or a CheckpointError saying what it is.

    ``O_NONBLOCK``: a FIFO put in the file's place must not block the open; the kind is checked on the open
    file itself (``fstat``), so nothing swapped in between a check and the open gets through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise CheckpointError("file does not exist", path=path) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot open file: {exc}", path=path) from exc
    stat = os.fstat(fd)
    reason = not_a_file(path, stat.st_mode)
    if reason is not None:
        os.close(fd)
        raise CheckpointError(f"{reason}: a safetensors file was expected here", path=path)
    return fd, stat


class ShardFile:
    """A safetensors file held open from header parsing until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` and parse its header (raises :class:`CheckpointError` naming the file)."""
        self.path = path
        self._fd, self._stat = _open_regular(path)
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        try:
            self.header: Header = parse_header(path, self._fd, self._stat.st_size)
        except BaseException:
            self._close_fd()
            raise
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """The file's size when it was opened."""
        return self._stat.st_size

    def view(self, entry: HeaderEntry) -> torch.Tensor:
        """The tensor of ``entry`` as a view of the file's private memory map: no copy, pages read on first touch.

        The map is copy-on-write (``MAP_PRIVATE``): writing into the tensor never writes the file.
        """
        info = entry.info
        if entry.end == entry.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        try:
            flat = torch.frombuffer(
                self._mapping(),
                dtype=info.dtype,
                count=info.nbytes // info.dtype.itemsize,
                offset=self._offset(entry),
            )
        except ValueError as exc:  # the mapping is shorter than the header says: cut since it was opened
            raise CorruptCheckpointError(
                f"tensor data lies beyond the end of the file: {exc}", path=self.path, key=info.key
            ) from exc
        return flat.view(info.shape)

    def pread(self, entry: HeaderEntry, target: memoryview, offset: int) -> None:
        """Fill ``target`` from byte ``offset`` of ``entry``'s data; a short read means the file was cut."""
        if not self._close_fd.alive:
            raise CheckpointError("checkpoint is closed", path=self.path, key=entry.info.key)
        try:
            got = pread_exactly(self._fd, target, self._offset(entry) + offset)
        except OSError as exc:
            raise CheckpointError(
                f"cannot read tensor data: {exc}", path=self.path, key=entry.info.key
            ) from exc
        if got != len(target):
            raise CorruptCheckpointError(
                "file ended inside the tensor's data (was it cut while being read?)",
                path=self.path,
                key=entry.info.key,
            )

    def check_unchanged(self) -> None:
        """Raise :class:`CorruptCheckpointError` when the open file was modified in place since it was opened.

        A file replaced by rename is fine (we still read the one we opened); one written to in place gave us a
        mix of its old and new bytes.
        """
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            raise CorruptCheckpointError(
                f"file was modified in place while it was being read (size {self._stat.st_size} -> "
                f"{now.st_size} bytes): update checkpoints by renaming a complete new file over the old one",
                path=self.path,
            )

    def close(self) -> None:
        """Close the file and drop our reference to its memory map.

        The map is never closed explicitly: tensors handed out by :meth:`view` hold a reference to it (but no
        buffer export ``mmap.close`` would see), so it is unmapped when the last of them is freed.
        """
        with self._lock:
            self._map = None
            self._close_fd()

    def _offset(self, entry: HeaderEntry) -> int:
        return self.header.data_start + entry.begin

    def _mapping(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                if not self._close_fd.alive:
                    raise CheckpointError("checkpoint is closed", path=self.path)
                try:
                    self._map = mmap.mmap(
                        self._fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                    )
                except (OSError, ValueError) as exc:
                    raise CheckpointError(f"cannot memory-map file: {exc}", path=self.path) from exc
            return self._map
