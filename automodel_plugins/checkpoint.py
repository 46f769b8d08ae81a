"""Lazy, validated reader for safetensors checkpoints (one file, or shards listed by an index).

Every header is parsed and checked at open time without touching tensor data, so a truncated or
tampered checkpoint fails before any model is built, with an error that names the file and key.
Data is then read through ``safetensors.safe_open``: whole tensors are memory-mapped (zero copy),
slices read only their region. Nothing in the directory is ever executed or unpickled.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from automodel_plugins.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointPathError

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_FILE_NAME = "model.safetensors"
# safetensors refuses headers above 100 MB; refusing them here keeps a hostile length from allocating.
MAX_HEADER_BYTES = 100_000_000


def _build_dtype_table() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes, limited to what this torch build has."""
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
    }
    return {st: getattr(torch, name) for st, name in names.items() if hasattr(torch, name)}


SAFETENSORS_DTYPES: dict[str, torch.dtype] = _build_dtype_table()


@dataclass(frozen=True)
class TensorInfo:
    """What a shard's header says about one tensor; reading it touches no tensor data."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    nbytes: int


@dataclass(frozen=True)
class _Entry:
    """Header entry plus its byte range inside the file's data section (kept private)."""

    info: TensorInfo
    begin: int
    end: int


# --- header parsing --------------------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key written twice in a header would silently shadow a tensor."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """Return (header JSON, data section size) after checking the length prefix against the file size."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise CorruptCheckpointError(
                    f"file is {size} bytes, too short for a safetensors header", path=file
                )
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise CorruptCheckpointError(
                    f"header length {length} exceeds the file size ({size} bytes): truncated or not safetensors",
                    path=file,
                )
            if length > MAX_HEADER_BYTES:
                raise CorruptCheckpointError(
                    f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit", path=file
                )
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read file: {exc}", path=file) from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"header is not valid JSON: {exc}", path=file) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError("header is not a JSON object", path=file)
    return header, size - 8 - length


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(file: Path, key: str, raw: Any, data_size: int) -> _Entry:
    """Validate one header entry: known dtype, sane shape, offsets that match shape x dtype and fit the file."""
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise CorruptCheckpointError("header entry lacks dtype/shape/data_offsets", path=file, key=key)
    dtype = SAFETENSORS_DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"unknown dtype {raw['dtype']!r}", path=file, key=key)
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"invalid shape {shape!r}", path=file, key=key)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CorruptCheckpointError(f"invalid data_offsets {offsets!r}", path=file, key=key)
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != expected:
        raise CorruptCheckpointError(
            f"data_offsets {offsets} span {end - begin} bytes but shape {shape} of {raw['dtype']} "
            f"needs {expected}",
            path=file,
            key=key,
        )
    if end > data_size:
        raise CorruptCheckpointError(
            f"tensor data ends at byte {end} but the file's data section holds only {data_size} bytes "
            "(truncated file)",
            path=file,
            key=key,
        )
    info = TensorInfo(key=key, dtype=dtype, shape=tuple(shape), file=file, nbytes=end - begin)
    return _Entry(info=info, begin=begin, end=end)


def _check_coverage(file: Path, entries: list[_Entry], data_size: int) -> None:
    """Tensors must tile the data section exactly, as safetensors itself demands (no gaps, no overlap)."""
    position = 0
    for entry in entries:
        if entry.begin != position:
            what = (
                "overlaps the previous tensor"
                if entry.begin < position
                else f"leaves a gap at byte {position}"
            )
            raise CorruptCheckpointError(f"tensor data {what}", path=file, key=entry.info.key)
        position = entry.end
    if position != data_size:
        raise CorruptCheckpointError(
            f"data section has {data_size - position} trailing bytes no tensor covers", path=file
        )


def parse_header(file: Path) -> list[_Entry]:
    """Every tensor entry of one safetensors file, ordered by offset, validated without reading data."""
    header, data_size = _read_header(file)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptCheckpointError("__metadata__ is not a JSON object", path=file)
    entries = sorted(
        (_parse_entry(file, key, raw, data_size) for key, raw in header.items()), key=lambda e: e.begin
    )
    _check_coverage(file, entries, data_size)
    return entries


# --- locating the shard files ----------------------------------------------------------------------------


def _allowed_roots(directory: Path) -> list[Path]:
    """Where index entries may resolve: the checkpoint directory, plus the blob store of a Hugging Face
    cache snapshot (``models--org--name/snapshots/<rev>/`` links every file into ``../../blobs/``)."""
    roots = [directory]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append(directory.parent.parent / "blobs")
    return roots


def _is_within(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def _resolve_entry(directory: Path, index: Path, key: str, name: str) -> Path:
    """Resolve one weight_map file name, refusing anything that could escape the checkpoint directory."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name in ("", "."):
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} is not a plain file name inside the checkpoint directory",
            path=index,
            key=key,
        )
    resolved = (directory / relative).resolve()
    if not any(_is_within(resolved, root) for root in _allowed_roots(directory)):
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} resolves to {resolved}, outside the checkpoint directory {directory}",
            path=index,
            key=key,
        )
    return resolved


def _load_weight_map(index: Path) -> dict[str, str]:
    """Parse the index JSON and return its weight_map (tensor key -> file name)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read index: {exc}", path=index) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"index is not valid JSON: {exc}", path=index) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError("index has no 'weight_map' object", path=index)
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CorruptCheckpointError(f"weight_map value {name!r} is not a file name", path=index, key=key)
    return weight_map


def _files_from_index(directory: Path, index: Path) -> tuple[tuple[Path, ...], dict[Path, set[str]]]:
    """Shard files named by the index (ordered by name) and the keys the index assigns to each."""
    weight_map = _load_weight_map(index)
    assigned: dict[Path, set[str]] = {}
    names: dict[Path, str] = {}
    for key, name in weight_map.items():
        file = _resolve_entry(directory, index, key, name)
        assigned.setdefault(file, set()).add(key)
        names.setdefault(file, name)
    for file, name in names.items():
        if not file.is_file():
            raise CheckpointError(f"shard {name!r} named by {index.name} does not exist", path=file)
    files = tuple(sorted(assigned, key=lambda f: (names[f], str(f))))
    return files, assigned


def _single_file_in(directory: Path) -> Path:
    """The one safetensors file of an unindexed directory (``model.safetensors`` wins if present)."""
    preferred = directory / DEFAULT_FILE_NAME
    if preferred.is_file():
        return preferred.resolve()
    candidates = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not candidates:
        raise CheckpointError("no *.safetensors file and no index in checkpoint directory", path=directory)
    if len(candidates) > 1:
        raise CheckpointError(
            f"{len(candidates)} *.safetensors files but no {INDEX_NAME} to say which to use: "
            + ", ".join(p.name for p in candidates),
            path=directory,
        )
    return candidates[0].resolve()


# --- the checkpoint --------------------------------------------------------------------------------------


class Checkpoint:
    """A safetensors checkpoint (single file or sharded with model.safetensors.index.json), read lazily."""

    def __init__(self, directory: Path, files: tuple[Path, ...], index: Path | None = None) -> None:
        """Parse and cross-check every header; use :meth:`open` rather than calling this directly."""
        self.directory = directory
        self.files = files
        self.index_path = index
        self.bytes_read = 0
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[Path, Any] = {}
        self._data_starts: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        for file in files:
            for entry in parse_header(file):
                other = self._entries.get(entry.info.key)
                if other is not None:
                    raise CorruptCheckpointError(
                        f"tensor also stored in {other.info.file}", path=file, key=entry.info.key
                    )
                self._entries[entry.info.key] = entry

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open a checkpoint directory, a single ``.safetensors`` file, or an ``*.index.json`` file."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError("checkpoint path does not exist", path=path)
        if path.is_dir():
            directory = path.resolve()
            index = directory / INDEX_NAME
            if not index.is_file():
                return cls(directory, (_single_file_in(directory),))
        elif path.name.endswith(".index.json"):
            directory, index = path.parent.resolve(), path
        else:
            return cls(path.resolve().parent, (path.resolve(),))
        files, assigned = _files_from_index(directory, index)
        checkpoint = cls(directory, files, index)
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
        return self.directory / "config.json"

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

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise CheckpointError(f"no tensor {key!r} in checkpoint", path=self.directory, key=key)
        return entry

    # --- data access -------------------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor as stored, memory-mapped from the file (no copy, no dtype change)."""
        entry = self._entry(key)
        tensor = self._read(entry, lambda handle: handle.get_tensor(key))
        self._count(entry.info.nbytes)
        return tensor

    def slice(self, key: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only ``region`` of a tensor (one step-1 slice per leading dim), read without loading the rest."""
        entry = self._entry(key)
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
        entry = self._entry(key)
        info = entry.info
        bounds = _normalize_region(info, region) if region is not None else ()
        shape = [b.stop - b.start for b in bounds] + list(info.shape[len(bounds) :])
        out = torch.empty(shape, dtype=info.dtype)
        if out.numel():
            self._pread_region(entry, bounds, out)
        self._count(out.numel() * out.element_size())
        return out

    def _pread_region(self, entry: _Entry, bounds: tuple[slice, ...], out: torch.Tensor) -> None:
        """Fill ``out`` with the box ``bounds`` of ``entry``: one read per contiguous run of bytes."""
        info, itemsize = entry.info, out.element_size()
        full_shape = info.shape
        # The last bounded dim that is narrower than the tensor: everything after it is contiguous.
        cut = max((d + 1 for d, b in enumerate(bounds) if (b.start, b.stop) != (0, full_shape[d])), default=0)
        strides = [math.prod(full_shape[d + 1 :]) for d in range(len(full_shape))]
        run_elems = math.prod(out.shape[cut - 1 :]) if cut else out.numel()
        outer = [range(b.start, b.stop) for b in bounds[: max(cut - 1, 0)]]
        inner_start = bounds[cut - 1].start * strides[cut - 1] if cut else 0
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        base = self._data_start(info.file) + entry.begin
        length = run_elems * itemsize
        with open(info.file, "rb", buffering=0) as fh:
            for run, index in enumerate(itertools.product(*outer)):
                offset = base + (sum(i * strides[d] for d, i in enumerate(index)) + inner_start) * itemsize
                _pread_exactly(fh.fileno(), buffer[run * length : (run + 1) * length], offset, entry)

    def _data_start(self, file: Path) -> int:
        """Byte offset of a shard's data section: after the 8-byte length and the header."""
        with self._lock:
            start = self._data_starts.get(file)
            if start is None:
                with open(file, "rb") as fh:
                    start = 8 + struct.unpack("<Q", fh.read(8))[0]
                self._data_starts[file] = start
            return start

    def _read(self, entry: _Entry, fetch) -> torch.Tensor:
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


def _pread_exactly(fd: int, target: memoryview, offset: int, entry: _Entry) -> None:
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
