"""Lazy, validated reader for safetensors checkpoints (one file, or shards listed by an index).

Every header is parsed and checked at open time without touching tensor data, so a truncated or
tampered checkpoint fails before any model is built, with an error that names the file and key. The headers of
a hub repo's shards not downloaded yet come from range requests and pass the same checks; such a "header-only"
file answers every question but refuses data reads until it is fetched.
Data is then read through ``safetensors.safe_open``: whole tensors are memory-mapped (zero copy),
slices read only their region. Nothing in the directory is ever executed or unpickled.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from automodel_plugins.checkpoint.header import HeaderEntry, TensorInfo, parse_header, parse_header_bytes
from automodel_plugins.checkpoint.index import shard_files, shard_names
from automodel_plugins.checkpoint.regions import box_runs, box_shape
from automodel_plugins.errors import CheckpointError, CorruptCheckpointError
from automodel_plugins.sources.resolve import CONFIG_NAME, INDEX_NAME, CheckpointLocation, resolve

__all__ = ["Checkpoint"]


class Checkpoint:
    """A safetensors checkpoint (single file or sharded with model.safetensors.index.json), read lazily."""

    def __init__(
        self,
        directory: Path,
        files: tuple[Path, ...],
        index: Path | None = None,
        *,
        location: CheckpointLocation | None = None,
        headers: Mapping[Path, list[HeaderEntry]] | None = None,
    ) -> None:
        """Parse and cross-check every header; use :meth:`open` rather than calling this directly.

        ``headers`` holds entries already parsed for some of ``files`` (from a hub repo's range requests, with
        :func:`~automodel_plugins.checkpoint.header.parse_header_bytes`): those files are not read, and their
        tensor data cannot be read until the file exists locally.
        """
        self.directory = directory
        self.location = location
        self.files = files
        self.index_path = index
        self.bytes_read = 0
        self._entries: dict[str, HeaderEntry] = {}
        self._handles: dict[Path, Any] = {}
        self._data_starts: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._header_only = frozenset(headers or ())
        for file in files:
            for entry in headers[file] if file in self._header_only else parse_header(file):
                other = self._entries.get(entry.info.key)
                if other is not None:
                    raise CorruptCheckpointError(
                        f"tensor also stored in {other.info.file}", path=file, key=entry.info.key
                    )
                self._entries[entry.info.key] = entry

    @classmethod
    def open(
        cls,
        path: str | Path | CheckpointLocation,
        *,
        download: bool = True,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ) -> Checkpoint:
        """Open a checkpoint directory, a single ``.safetensors`` file, an ``*.index.json`` file, the
        checkpoint a ``config.json`` path belongs to, or a hub repo id (see
        :func:`automodel_plugins.sources.resolve`, which the hub options go to).

        For a repo, ``download`` fetches the weights files into the Hugging Face cache; ``download=False``
        reads the headers of those not cached with range requests instead (all of ``inspect``, and a pipeline
        stage's plan): tensor data of such a file raises :class:`CheckpointError` until it is fetched.
        """
        location = resolve(
            path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        weights = location.weights()
        names = [weights.file.name] if weights.index is None else sorted(shard_names(weights.index))
        if download:
            location.fetch(names)
        remote = location.header_bytes(names)
        headers = {
            location.directory / name: parse_header_bytes(location.directory / name, *head)
            for name, head in remote.items()
        }
        if weights.index is None:
            return cls(location.directory, (weights.file,), location=location, headers=headers)
        files, assigned = shard_files(location, weights.index, remote=remote)
        checkpoint = cls(location.directory, files, weights.index, location=location, headers=headers)
        checkpoint._check_index(assigned)
        return checkpoint

    def _check_index(self, assigned: dict[Path, set[str]]) -> None:
        """The index must list exactly the keys each shard's header holds, in the right shard."""
        index_name = self.index_path.name if self.index_path else INDEX_NAME
        for file in self.files:
            stored = {k for k, e in self._entries.items() if e.info.file == file}
            listed = assigned.get(file, set())
            for key in sorted(listed - stored):
                where = self._entries[key].info.file.name if key in self._entries else "no shard"
                raise CorruptCheckpointError(
                    f"{index_name} maps this key to {file.name} but its header lacks it (found in {where})",
                    path=file,
                    key=key,
                )
            for key in sorted(stored - listed):
                raise CorruptCheckpointError(
                    f"tensor is in this shard's header but {index_name} does not map it here",
                    path=file,
                    key=key,
                )

    # --- header-only queries -----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The ``config.json`` of this checkpoint (the one the user named, else the directory's)."""
        return self.location.config if self.location is not None else self.directory / CONFIG_NAME

    def keys(self) -> list[str]:
        """Every tensor key, ordered by shard file then by offset within it."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries))

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape, file and size of a tensor, from the header alone."""
        return self._entry(key).info

    def total_nbytes(self) -> int:
        return sum(e.info.nbytes for e in self._entries.values())

    def _entry(self, key: str) -> HeaderEntry:
        entry = self._entries.get(key)
        if entry is None:
            raise CheckpointError(f"no tensor {key!r} in checkpoint", path=self.directory, key=key)
        return entry

    def _data_entry(self, key: str) -> HeaderEntry:
        """The entry of a tensor about to be read: its file must be here, not only its header."""
        entry = self._entry(key)
        file = entry.info.file
        if file in self._header_only and not file.is_file():
            raise CheckpointError(
                "only this file's header was read (range requests to the hub): its tensor data is not "
                "downloaded; load with from_pretrained / load_weights, or Checkpoint.open(..., download=True)",
                path=file,
                key=key,
            )
        return entry

    # --- data access -------------------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor as stored, memory-mapped from the file (no copy, no dtype change)."""
        entry = self._data_entry(key)
        tensor = self._read(entry, lambda handle: handle.get_tensor(key))
        self._count(entry.info.nbytes)
        return tensor

    def slice(self, key: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only ``region`` of a tensor (one step-1 slice per leading dim), read without loading the rest."""
        entry = self._data_entry(key)
        bounds = _normalize_region(entry.info, region)
        if not bounds:
            return self.tensor(key)
        tensor = self._read(entry, lambda handle: handle.get_slice(key)[bounds])
        self._count(tensor.numel() * tensor.element_size())
        return tensor

    def read(self, key: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """A private copy of the tensor (or of only ``region``), read with plain file reads.

        For values about to be converted (FP8 dequantized, dtype cast): the bytes land in memory the caller
        frees, so pages of the checkpoint do not stay resident in this process the way a memory map keeps
        them, and a rank reading a shard reads exactly its region's bytes.
        """
        entry = self._data_entry(key)
        info = entry.info
        bounds = _normalize_region(info, region) if region is not None else ()
        out = torch.empty(box_shape(info.shape, bounds), dtype=info.dtype)
        if out.numel():
            self._pread_region(entry, bounds, out)
        self._count(out.numel() * out.element_size())
        return out

    def _pread_region(self, entry: HeaderEntry, bounds: tuple[slice, ...], out: torch.Tensor) -> None:
        """Fill ``out`` with the box ``bounds`` of ``entry``: one read per contiguous run of bytes."""
        info, itemsize = entry.info, out.element_size()
        run_elements, offsets = box_runs(info.shape, bounds)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        base = self._data_start(info.file) + entry.begin
        length = run_elements * itemsize
        with open(info.file, "rb", buffering=0) as fh:
            for run, offset in enumerate(offsets):
                target = buffer[run * length : (run + 1) * length]
                _pread_exactly(fh.fileno(), target, base + offset * itemsize, entry)

    def _data_start(self, file: Path) -> int:
        """Byte offset of a shard's data section: after the 8-byte length and the header."""
        with self._lock:
            start = self._data_starts.get(file)
            if start is None:
                with open(file, "rb") as fh:
                    start = 8 + struct.unpack("<Q", fh.read(8))[0]
                self._data_starts[file] = start
            return start

    def _read(self, entry: HeaderEntry, fetch) -> torch.Tensor:
        """Run ``fetch`` on the shard's handle, turning safetensors' own errors into ours."""
        handle = self._handle(entry.info.file)
        try:
            return fetch(handle)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"safetensors failed to read tensor: {exc}", path=entry.info.file, key=entry.info.key
            ) from exc

    def _handle(self, file: Path) -> Any:
        """The shard's safe_open handle, opened on first use and kept until close()."""
        with self._lock:
            if self._closed:
                raise CheckpointError("checkpoint is closed", path=self.directory)
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as exc:
                    raise CorruptCheckpointError(f"safetensors cannot open file: {exc}", path=file) from exc
                self._handles[file] = handle
            return handle

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def close(self) -> None:
        """Release every open file handle; tensors already handed out stay valid (they own their mapping)."""
        with self._lock:
            handles, self._handles = self._handles, {}
            self._closed = True
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, files={len(self.files)}, tensors={len(self)})"


def _pread_exactly(fd: int, target: memoryview, offset: int, entry: HeaderEntry) -> None:
    """Fill ``target`` from ``offset``; a short read means the file changed or was cut under us."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(
                "file ended inside the tensor's data", path=entry.info.file, key=entry.info.key
            )
        done += got


def _normalize_region(info: TensorInfo, region: tuple[slice, ...]) -> tuple[slice, ...]:
    """Turn a user region into explicit non-negative step-1 slices, rejecting what we cannot read lazily."""
    if isinstance(region, slice):
        region = (region,)
    if not isinstance(region, tuple) or not all(isinstance(s, slice) for s in region):
        raise TypeError(f"region must be a tuple of slices, got {region!r}")
    if len(region) > len(info.shape):
        raise ValueError(f"region has {len(region)} slices but {info.key!r} has shape {info.shape}")
    bounds = []
    for dim, (part, size) in enumerate(zip(region, info.shape[: len(region)], strict=True)):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(
                f"region slice {dim} of {info.key!r} has step {part.step}; only step 1 is supported"
            )
        bounds.append(slice(start, max(start, stop)))
    return tuple(bounds)
