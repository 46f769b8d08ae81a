"""Room on the cache's disk for what one fetch downloads, checked before any file's body is asked for.

huggingface_hub only warns when a file will not fit, then downloads until the disk is full (or the per-file
deadline ends it): a hub announcing a terabyte for a shard would fill the cache's filesystem. Here each file's
announced size (its ``HEAD``: ``X-Linked-Size`` / ``Content-Length``) is held against the free space of the
filesystem holding the cache's blobs, together with what the same fetch still has to download: the rest of the
files already started (announced minus what their ``.incomplete`` file holds) and the files whose sizes are
known before their ``HEAD`` (from the range requests that read their headers). A file whose blob is already in
the cache (another revision's) needs nothing. A file is downloaded whole (huggingface_hub does not resume into
a partial download left by a killed process), so its own announced size counts in full.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from automodel_plugins.errors import HubDiskSpaceError

__all__ = ["SpaceBudget", "free_bytes"]


def free_bytes(path: Path) -> int:
    """Free bytes of the filesystem holding ``path`` (its nearest existing ancestor: the cache may not exist
    yet). The one source of free space here: tests replace it to stand for a small disk."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def _written(blobs: Path, etag: str) -> int:
    """Bytes written so far of the blob ``etag``'s download: huggingface_hub writes it to
    ``<etag>.<unique>.incomplete`` (earlier releases: ``<etag>.incomplete``) beside the blob, then renames it."""
    total = 0
    for part in blobs.glob(f"{etag}*.incomplete"):  # a checked ETag has no glob characters
        with suppress(OSError):  # renamed meanwhile: then the blob is there
            total += part.stat().st_size
    return total


class SpaceBudget:
    """One fetch's downloads into one repo's ``blobs`` folder (thread-safe: files download several at once).

    ``known``: sizes of files still to download that are known before their ``HEAD``.
    """

    def __init__(
        self, repo_id: str, revision: str | None, blobs: Path, known: Mapping[str, int] | None = None
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.blobs = blobs
        self.pending = dict(known or {})
        self.started: dict[str, tuple[int, str]] = {}
        self.lock = threading.Lock()

    def check_known(self) -> None:
        """Refuse the fetch before any request when the files of known size do not fit together."""
        with self.lock:
            total, free = sum(self.pending.values()), free_bytes(self.blobs)
            if total <= free:
                return
            running = 0
            for name, size in sorted(self.pending.items()):
                running += size
                if running > free:
                    raise self._refusal(name, size, total - size, free)

    def claim(self, name: str, announced: int, etag: str | None) -> None:
        """The hub announced ``announced`` bytes for ``name`` (blob ``etag``): refuse it unless it fits with the
        rest of this fetch still to download."""
        with self.lock:
            self.pending.pop(name, None)
            self.started.pop(name, None)
            if etag and (self.blobs / etag).is_file():
                return  # already in the cache (another revision's file): only linked
            free = free_bytes(self.blobs)  # first: bytes written after it are not counted twice
            others = sum(self.pending.values()) + sum(
                self._outstanding(size, tag) for size, tag in self.started.values()
            )
            if announced + others > free:
                raise self._refusal(name, announced, others, free)
            if etag:
                self.started[name] = (announced, etag)

    def _outstanding(self, size: int, etag: str) -> int:
        """What a started download still lacks: its partial file is read before its blob is looked for, so a
        rename between the two is never missed."""
        written = _written(self.blobs, etag)
        if not written and (self.blobs / etag).is_file():
            return 0
        return max(size - written, 0)

    def done(self, name: str) -> None:
        """``name`` is downloaded (or failed): it takes no more room."""
        with self.lock:
            self.pending.pop(name, None)
            self.started.pop(name, None)

    def _refusal(self, name: str, announced: int, others: int, free: int) -> HubDiskSpaceError:
        rest = (
            f"; with the {others} bytes this load still downloads besides, {announced + others} bytes,"
            if others
            else ","
        )
        error = HubDiskSpaceError(
            self.repo_id,
            f"the hub announces {announced} bytes{rest} more than the {free} bytes free on the cache's filesystem "
            f"({self.blobs}): not downloading it (free space, or "
            "point cache_dir / HF_HUB_CACHE at a larger disk)",
            revision=self.revision,
            filename=name,
        )
        error.announced, error.free = announced, free
        return error
