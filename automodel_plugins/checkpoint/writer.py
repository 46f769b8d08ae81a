"""A streaming safetensors writer: the header is computed up front from names, dtypes and shapes alone, the file
is created at its full size, and each tensor (or any box of it, from any process) is written at its own offset.

The bytes are exactly those ``safetensors.torch.save_file`` writes for the same tensors (safetensors 0.8):

* an 8-byte little-endian header length, then the header JSON, compact (``","`` and ``":"``, UTF-8 as is),
  ``__metadata__`` first when given, then one ``{"dtype","shape","data_offsets"}`` entry per tensor, padded with
  spaces to a multiple of 8 bytes;
* tensors in safetensors' own order: by dtype, in the reverse of the Rust ``enum Dtype`` declaration order
  (``I64`` before ``F32`` before ``BF16`` before ``F8_E4M3`` ...), then by name; data back to back.

So nothing is serialized in memory: a process holding one shard of a tensor writes that shard's byte runs
with ``pwrite`` into the file another process created, and a 2-rank save is the same file as a 1-process one.
Only a ``__metadata__`` of at most one key is deterministic in ``save_file`` (it keeps it in a hash map), which
is all transformers writes (``{"format": "pt"}``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from automodel_plugins.checkpoint.header import MAX_HEADER_BYTES, SAFETENSORS_DTYPES
from automodel_plugins.checkpoint.regions import box_runs, box_shape

__all__ = ["FileLayout", "SafetensorsWriter", "TensorSpec", "dtype_name", "tensor_bytes"]

# safetensors/src/tensor.rs ``enum Dtype``, in declaration order; ``prepare`` sorts by it descending.
_DECLARATION_ORDER = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_RANK = {name: rank for rank, name in enumerate(_DECLARATION_ORDER)}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``F32``, ``BF16``, ``F8_E4M3`` ...); only dtypes the reader reads."""
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} has no safetensors name this package reads back")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """What a header says about a tensor: its key, dtype and (global) shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FileLayout:
    """One file's header bytes (length prefix included) and each tensor's byte range in the file."""

    header: bytes
    specs: Mapping[str, TensorSpec]
    ranges: Mapping[str, tuple[int, int]]
    """Absolute ``(begin, end)`` file offsets of each tensor's data."""

    @classmethod
    def plan(cls, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> FileLayout:
        """The layout ``save_file(tensors, metadata=metadata)`` gives tensors of these names, dtypes and shapes."""
        by_name = {spec.name: spec for spec in specs}
        if len(by_name) != len(specs):
            raise ValueError("tensor names in one file must be unique")
        ordered = sorted(specs, key=lambda spec: (-_RANK[dtype_name(spec.dtype)], spec.name))
        header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
        offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for spec in ordered:
            end = position + spec.nbytes
            header[spec.name] = {
                "dtype": dtype_name(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [position, end],
            }
            offsets[spec.name] = (position, end)
            position = end
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        if len(text) > MAX_HEADER_BYTES:
            raise ValueError(
                f"header of {len(text)} bytes exceeds safetensors' {MAX_HEADER_BYTES}-byte limit"
            )
        start = 8 + len(text)
        ranges = {name: (start + begin, start + end) for name, (begin, end) in offsets.items()}
        return cls(struct.pack("<Q", len(text)) + text, by_name, ranges)

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return len(self.header) + sum(spec.nbytes for spec in self.specs.values())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """One safetensors file being written: :meth:`create` it in one process, :meth:`attach` in the others, then
    each :meth:`write` puts a tensor's (or a box of a tensor's) bytes at their offsets.

    ``bytes_written`` counts the data bytes this process wrote. A short ``pwrite`` is retried; any ``OSError``
    (a full disk: ``ENOSPC``) propagates to the caller, who owns the temporary file.
    """

    def __init__(self, path: Path, layout: FileLayout, fd: int) -> None:
        self.path = path
        self.layout = layout
        self.bytes_written = 0
        self._fd: int | None = fd

    @classmethod
    def create(cls, path: str | Path, layout: FileLayout) -> SafetensorsWriter:
        """A new file of the checkpoint's full size holding the header (the rest sparse until written: reserving
        the blocks up front with ``fallocate`` made the writes after it slower than the whole save)."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, layout.size)
            _pwrite_all(fd, memoryview(layout.header), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, layout, fd)

    @classmethod
    def attach(cls, path: str | Path, layout: FileLayout) -> SafetensorsWriter:
        """The file another process :meth:`create`\\ d, opened to write this process's boxes into."""
        path = Path(path)
        return cls(path, layout, os.open(path, os.O_WRONLY))

    def write(self, name: str, data: memoryview | bytes, region: Sequence[slice] | None = None) -> int:
        """Write ``data``: the whole tensor ``name``, or the box ``region`` of it (explicit step-1 slices, the
        data in the box's row-major order). Returns the bytes written."""
        if self._fd is None:
            raise ValueError(f"{self.path}: writer is closed")
        spec = self.layout.specs[name]
        begin, _ = self.layout.ranges[name]
        data = memoryview(data).cast("B")
        bounds = tuple(region) if region is not None else ()
        expected = math.prod(box_shape(spec.shape, bounds)) * spec.dtype.itemsize
        if len(data) != expected:
            raise ValueError(
                f"{self.path} [{name}]: {len(data)} bytes given for a box of {expected} bytes "
                f"(shape {spec.shape}, region {bounds})"
            )
        if not expected:
            return 0
        itemsize = spec.dtype.itemsize
        run_elements, offsets = box_runs(spec.shape, bounds)
        length = run_elements * itemsize
        for run, offset in enumerate(offsets):
            _pwrite_all(self._fd, data[run * length : (run + 1) * length], begin + offset * itemsize)
        self.bytes_written += expected
        return expected

    def close(self, *, sync: bool = True) -> None:
        """Flush to disk (``fsync``) and close; closing twice is a no-op."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(sync=exc_info[0] is None)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
