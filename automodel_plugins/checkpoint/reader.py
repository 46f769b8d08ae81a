"""Lazy, validated reader for safetensors checkpoints (one file, or shards listed by an index).

Every header is parsed and checked at open time without touching tensor data, so a truncated or
tampered checkpoint fails before any model is built, with an error that names the file and key.
Each shard is opened once (:class:`~automodel_plugins.checkpoint.shard.ShardFile`) and all its data is read
through that open file: whole tensors as views of its memory map (zero copy), regions with ``pread``. A shard
replaced by rename meanwhile does not change what a load reads. The headers of a hub repo's shards not
downloaded yet come from range requests and pass the same checks; such a "header-only" file answers every
question but refuses data reads until it is fetched, and is then opened once like any other (its header checked
to be the one read before). Nothing in the directory is ever executed or unpickled.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, KeysView, Mapping
from operator import attrgetter
from pathlib import Path

import torch

from automodel_plugins.checkpoint.header import Header, HeaderEntry, TensorInfo, parse_header_bytes
from automodel_plugins.checkpoint.index import shard_files, shard_names
from automodel_plugins.checkpoint.regions import box_runs, box_shape
from automodel_plugins.checkpoint.shard import ShardFile
from automodel_plugins.errors import CheckpointError, CorruptCheckpointError
from automodel_plugins.sources.options import HubOptions
from automodel_plugins.sources.resolve import CONFIG_NAME, INDEX_NAME, CheckpointLocation, resolve

__all__ = ["Checkpoint"]

_KEY = attrgetter("info.key")
_INFO = attrgetter("info")


class Checkpoint:
    """A safetensors checkpoint (single file or sharded with model.safetensors.index.json), read lazily."""

    def __init__(
        self,
        directory: Path,
        files: tuple[Path, ...],
        index: Path | None = None,
        *,
        location: CheckpointLocation | None = None,
        headers: Mapping[Path, tuple[Header, int]] | None = None,
    ) -> None:
        """Parse and cross-check every header; use :meth:`open` rather than calling this directly.

        ``headers`` holds ``(header, file size)`` already parsed for some of ``files`` (a hub repo's shards, read
        with range requests by :func:`~automodel_plugins.checkpoint.header.parse_header_bytes`): those files are
        not opened now, and their tensor data cannot be read until the file exists locally.
        """
        self.directory = directory
        self.location = location
        self.files = files
        self.index_path = index
        self.bytes_read = 0
        self._entries: dict[str, HeaderEntry] = {}
        self._positions: dict[str, int] | None = None
        self._shards: dict[Path, ShardFile] = {}
        self._remote: dict[Path, tuple[Header, int]] = dict(headers or {})
        self._lock = threading.Lock()
        self._closed = False
        try:
            for file in files:
                if file in self._remote:
                    entries = self._remote[file][0].entries
                else:
                    self._shards[file] = shard = ShardFile(file)
                    entries = shard.header.entries
                keyed = dict(zip(map(_KEY, entries), entries, strict=True))  # a header holds a key once
                if not self._entries.keys().isdisjoint(keyed):
                    key = next(key for key in keyed if key in self._entries)
                    raise CorruptCheckpointError(
                        f"tensor also stored in {self._entries[key].info.file}", path=file, key=key
                    )
                self._entries.update(keyed)
        except BaseException:
            self.close()
            raise

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
        progress: bool | None = None,
    ) -> Checkpoint:
        """Open a checkpoint directory, a single ``.safetensors`` file, an ``*.index.json`` file, the
        checkpoint a ``config.json`` path belongs to, or a hub repo id (see
        :func:`automodel_plugins.sources.resolve`, which the hub options go to as one
        :class:`~automodel_plugins.sources.options.HubOptions`).

        For a repo, ``download`` fetches the weights files into the Hugging Face cache; ``download=False``
        reads the headers of those not cached with range requests instead (all of ``inspect``, and a pipeline
        stage's plan): tensor data of such a file raises :class:`CheckpointError` until it is fetched.
        """
        options = HubOptions(
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            progress=progress,
        )
        location = resolve(path, options)
        weights = location.weights()
        listed = None if weights.index is None else shard_names(weights.index)
        names = [weights.file.name] if listed is None else sorted(listed)
        if download:
            location.fetch(names)
        remote = location.header_bytes(names)
        headers = {
            location.directory / name: (parse_header_bytes(location.directory / name, head, size), size)
            for name, (head, size) in remote.items()
        }
        if weights.index is None:
            return cls(location.directory, (weights.file,), location=location, headers=headers)
        files, assigned = shard_files(location, weights.index, remote=remote, names=listed)
        checkpoint = cls(location.directory, files, weights.index, location=location, headers=headers)
        try:
            checkpoint._check_index(assigned)
        except BaseException:
            checkpoint.close()
            raise
        return checkpoint

    def _check_index(self, assigned: dict[Path, set[str]]) -> None:
        """The index must list exactly the keys each shard's header holds, in the right shard."""
        index_name = self.index_path.name if self.index_path else INDEX_NAME
        for file in self.files:
            stored = set(map(_KEY, self._header(file).entries))
            listed = assigned.get(file, set())
            if listed == stored:
                continue  # one comparison; the keys at fault are found below only when there are any
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

    @property
    def stored_keys(self) -> KeysView[str]:
        """Every tensor key, as a read-only set-like view in :meth:`keys` order: ``key in view`` is one dict
        lookup, without the method call ``key in checkpoint`` costs (planning a 235B MoE asks ~150k times)."""
        return self._entries.keys()

    def infos(self) -> Iterator[TensorInfo]:
        """What the headers say about every tensor, in :meth:`keys` order."""
        return (entry.info for entry in self._entries.values())

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries))

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape, file and size of a tensor, from the header alone."""
        entry = self._entries.get(key)  # inline, not self._entry: planning a 235B MoE asks ~500k times
        return entry.info if entry is not None else self._entry(key).info

    def positions(self) -> dict[str, int]:
        """Each key's index in :meth:`keys`, made once (both of ``inspect``'s plans order their tensors by it);
        read-only."""
        if self._positions is None:
            self._positions = dict(zip(self._entries, itertools.count()))
        return self._positions

    def infos_of(self, keys: Iterable[str]) -> list[TensorInfo]:
        """:meth:`info` of each of ``keys``, in order, in one C-level pass (planning asks for a fused experts
        tensor's 256 pieces at once)."""
        try:
            return list(map(_INFO, map(self._entries.__getitem__, keys)))
        except KeyError as exc:
            key = exc.args[0]
            raise CheckpointError(f"no tensor {key!r} in checkpoint", path=self.directory, key=key) from None

    def total_nbytes(self) -> int:
        return sum(e.info.nbytes for e in self._entries.values())

    def file_size(self, file: Path) -> int:
        """The size of shard ``file`` (one of :attr:`files`) as it was when opened (or when its header was read)."""
        shard = self._shards.get(file)
        return shard.size if shard is not None else self._remote[file][1]

    def _header(self, file: Path) -> Header:
        """The parsed header of shard ``file`` (one of :attr:`files`)."""
        shard = self._shards.get(file)
        return shard.header if shard is not None else self._remote[file][0]

    def _entry(self, key: str) -> HeaderEntry:
        entry = self._entries.get(key)
        if entry is None:
            raise CheckpointError(f"no tensor {key!r} in checkpoint", path=self.directory, key=key)
        return entry

    # --- data access -------------------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor as stored, a view of the shard's memory map (no copy, no dtype change)."""
        entry = self._entry(key)
        tensor = self._shard(entry).view(entry)
        self._count(entry.info.nbytes)
        return tensor

    def slice(self, key: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only ``region`` of a tensor (one step-1 slice per leading dim), a view of the memory map: only the
        pages of the region are ever read."""
        entry = self._entry(key)
        bounds = _normalize_region(entry.info, region)
        if not bounds:
            return self.tensor(key)
        tensor = self._shard(entry).view(entry)[bounds]
        self._count(tensor.numel() * tensor.element_size())
        return tensor

    def read(self, key: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
        """A private copy of the tensor (or of only ``region``), read with plain file reads.

        For values about to be converted (FP8 dequantized, dtype cast): the bytes land in memory the caller
        frees, so pages of the checkpoint do not stay resident in this process the way a memory map keeps
        them, and a rank reading a shard reads exactly its region's bytes.
        """
        entry = self._entry(key)
        info = entry.info
        bounds = _normalize_region(info, region) if region is not None else ()
        out = torch.empty(box_shape(info.shape, bounds), dtype=info.dtype)
        if out.numel():
            self._pread_region(entry, bounds, out)
        self._count(out.numel() * out.element_size())
        return out

    def _pread_region(self, entry: HeaderEntry, bounds: tuple[slice, ...], out: torch.Tensor) -> None:
        """Fill ``out`` with the box ``bounds`` of ``entry``: one read per contiguous run of bytes."""
        itemsize = out.element_size()
        run_elements, offsets = box_runs(entry.info.shape, bounds)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        length = run_elements * itemsize
        shard = self._shard(entry)
        for run, offset in enumerate(offsets):
            shard.pread(entry, buffer[run * length : (run + 1) * length], offset * itemsize)

    def _shard(self, entry: HeaderEntry) -> ShardFile:
        """The open shard holding ``entry``; refused once the checkpoint is closed. A file known only by its
        header (a hub shard) is opened when it has been downloaded, and must hold exactly that header."""
        file = entry.info.file
        with self._lock:
            if self._closed:
                raise CheckpointError("checkpoint is closed", path=self.directory)
            shard = self._shards.get(file)
            if shard is not None:
                return shard
            if not file.is_file():
                raise CheckpointError(
                    "only this file's header was read (range requests to the hub): its tensor data is not "
                    "downloaded; load with from_pretrained / load_weights, or Checkpoint.open(..., "
                    "download=True)",
                    path=file,
                    key=entry.info.key,
                )
            shard = ShardFile(file)
            if shard.header != self._remote[file][0] or shard.size != self._remote[file][1]:
                shard.close()
                raise CorruptCheckpointError(
                    "the downloaded file's header differs from the header read from the hub before it: the "
                    "repo changed during the load",
                    path=file,
                    key=entry.info.key,
                )
            self._shards[file] = shard
            return shard

    def check_unchanged(self) -> None:
        """Raise :class:`CorruptCheckpointError` naming a shard that was modified in place since it was opened
        (one replaced by rename is fine: it is still the file we read)."""
        for shard in self._shards.values():
            shard.check_unchanged()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def close(self) -> None:
        """Close every shard file; tensors already handed out stay valid (they hold their memory map)."""
        with self._lock:
            shards = list(self._shards.values())
            self._closed = True
        for shard in shards:
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, files={len(self.files)}, tensors={len(self)})"


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
