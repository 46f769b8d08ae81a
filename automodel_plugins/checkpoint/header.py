"""The safetensors header: parsed and checked against the file before any tensor data is touched.

A header is an 8-byte little-endian length, a JSON object of ``key -> {dtype, shape, data_offsets}`` (plus an
optional ``__metadata__``), then the data section. Every entry is validated (known dtype, sane shape, offsets
that match shape x dtype, inside the file, tiling the data section without gaps or overlap), so a truncated or
tampered file fails with an error naming the file and key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, itemgetter, mul, sub
from pathlib import Path
from typing import Any, NamedTuple

import torch

from automodel_plugins.errors import CheckpointError, CorruptCheckpointError
from automodel_plugins.sources.head import MAX_HEADER_BYTES, header_length

__all__ = [
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "Header",
    "HeaderEntry",
    "TensorInfo",
    "header_length",
    "parse_header",
    "parse_header_bytes",
    "pread_exactly",
]


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


class TensorInfo(NamedTuple):
    """What a shard's header says about one tensor; reading it touches no tensor data.

    An immutable record like a frozen dataclass, but made in C: a 235B MoE's headers hold 73,768 of them, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost more than parsing their JSON."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    nbytes: int


class HeaderEntry(NamedTuple):
    """A header entry: what it says about the tensor, and its byte range inside the file's data section."""

    info: TensorInfo
    begin: int
    end: int


_new = tuple.__new__
"""``_new(TensorInfo, fields)``: a record from a tuple of its fields, without a Python-level ``__new__`` call."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key written twice in a header would silently shadow a tensor. (The dict is built in
    C; the keys are walked only when it came out shorter than the pairs: a 73k-entry header calls this 73k
    times.)"""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def pread_exactly(fd: int, target: memoryview, offset: int) -> int:
    """Fill ``target`` from byte ``offset`` of the open file ``fd``; returns the bytes read, fewer only when the
    file ends first."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def _read_bytes(file: Path, fd: int, offset: int, length: int, what: str) -> bytes:
    buffer = bytearray(length)
    try:
        got = pread_exactly(fd, memoryview(buffer), offset)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what}: {exc}", path=file) from exc
    if got != length:
        raise CorruptCheckpointError(f"file ended inside the {what}", path=file)
    return bytes(buffer)


def _read_head(file: Path, fd: int, size: int) -> bytes:
    """The first ``8 + header length`` bytes of the open file ``fd`` of ``size`` bytes."""
    if size < 8:
        raise CorruptCheckpointError(f"file is {size} bytes, too short for a safetensors header", path=file)
    prefix = _read_bytes(file, fd, 0, 8, "header length")
    return prefix + _read_bytes(file, fd, 8, header_length(file, prefix, size), "header")


def _decode_header(file: Path, head: bytes, file_size: int) -> tuple[dict[str, Any], int]:
    """Return (header JSON, header length) from the file's first ``8 + length`` bytes."""
    length = header_length(file, head, file_size)
    raw = head[8 : 8 + length]
    if len(raw) != length:
        raise CorruptCheckpointError(
            f"header is {len(raw)} bytes, its length prefix says {length}", path=file
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"header is not valid JSON: {exc}", path=file) from exc
    except RecursionError as exc:
        raise CorruptCheckpointError("header JSON is nested too deeply to parse", path=file) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError("header is not a JSON object", path=file)
    return header, length


_BEGIN, _END = attrgetter("begin"), attrgetter("end")
_INT = frozenset({int})
_LIST = frozenset({list})
_PAIR = frozenset({2})


def _naturals(values: Any) -> bool:
    """A JSON array of integers >= 0 (not booleans: JSON ``true`` is no dimension). Checked with C-level
    calls, no Python per element: a 235B MoE's headers hold ~150k of them."""
    return type(values) is list and set(map(type, values)) <= _INT and min(values, default=0) >= 0


def _parse_entry(file: Path, key: str, raw: Any, data_size: int) -> HeaderEntry:
    """Validate one header entry: known dtype, sane shape, offsets that match shape x dtype and fit the file."""
    try:
        name, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    except (KeyError, TypeError):  # a field missing, or no JSON object at all
        raise CorruptCheckpointError(
            "header entry lacks dtype/shape/data_offsets", path=file, key=key
        ) from None
    dtype = SAFETENSORS_DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise CorruptCheckpointError(f"unknown dtype {name!r}", path=file, key=key)
    if not _naturals(shape):
        raise CorruptCheckpointError(f"invalid shape {shape!r}", path=file, key=key)
    if not (_naturals(offsets) and len(offsets) == 2):
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
    return HeaderEntry(
        TensorInfo(key, dtype, tuple(shape), file, end - begin), begin, end
    )  # positional: faster


def _parse_entries(file: Path, header: dict[str, Any], data_size: int) -> list[HeaderEntry] | None:
    """Every entry of ``header`` when all pass :func:`_parse_entry`'s checks, else ``None``.

    The same checks, made on all entries at once (each a pass of C-level ``map`` calls over all entries, no
    Python code per entry: a 235B MoE's headers hold 73,768 entries): each field's type, every dimension and
    offset an integer >= 0, every offset pair's span the shape's bytes and inside the data section. The caller
    finds the first bad entry, and its error, with :func:`_parse_entry`."""
    raws = list(header.values())
    try:
        shapes = list(map(itemgetter("shape"), raws))
        offsets = list(map(itemgetter("data_offsets"), raws))
        dtypes = list(map(SAFETENSORS_DTYPES.__getitem__, map(itemgetter("dtype"), raws)))
    except (KeyError, TypeError):  # a field missing, no JSON object, an unknown (or unhashable) dtype
        return None
    if not (set(map(type, shapes)) <= _LIST and set(map(type, offsets)) <= _LIST):
        return None
    if not (
        set(map(len, offsets)) <= _PAIR and _naturals(list(chain(chain.from_iterable(shapes), *offsets)))
    ):
        return None
    begins, ends = list(map(itemgetter(0), offsets)), list(map(itemgetter(1), offsets))
    nbytes = list(map(sub, ends, begins))
    expected = map(mul, map(math.prod, shapes), map(attrgetter("itemsize"), dtypes))
    if not all(map(int.__eq__, nbytes, expected)) or max(ends, default=0) > data_size:
        return None
    fields = zip(header, dtypes, map(tuple, shapes), repeat(file), nbytes)
    infos = map(_new, repeat(TensorInfo), fields)
    return list(map(_new, repeat(HeaderEntry), zip(infos, begins, ends, strict=False)))


def _check_coverage(file: Path, entries: list[HeaderEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly, as safetensors itself demands (no gaps, no overlap)."""
    ends = list(map(_END, entries))
    if list(map(_BEGIN, entries)) == [0, *ends[:-1]] and (ends[-1] if ends else 0) == data_size:
        return  # every tensor starts where the one before ends (checked in C); else find the first that does not
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


@dataclass(frozen=True)
class Header:
    """A parsed header: its entries ordered by offset, and where the data section starts in the file."""

    entries: list[HeaderEntry]
    data_start: int


def parse_header(file: Path, fd: int, size: int) -> Header:
    """Every tensor entry of the safetensors file open as ``fd`` (``size`` bytes, named ``file`` in errors),
    ordered by offset and validated without reading data.

    The caller keeps ``fd`` to read the data: the offsets are valid for that open file only, not for whatever
    file the path names later.
    """
    return parse_header_bytes(file, _read_head(file, fd, size), size)


def parse_header_bytes(file: Path, head: bytes, file_size: int) -> Header:
    """The header of ``head`` (the file's first ``8 + length`` bytes, read from an open file or by HTTP range
    requests), with exactly the same checks whatever it came from, for a file of ``file_size`` bytes.

    ``file`` is where the entries say the data lives (for a hub file, where its download lands).
    """
    header, length = _decode_header(file, head, file_size)
    data_size = file_size - 8 - length
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptCheckpointError("__metadata__ is not a JSON object", path=file)
    entries = _parse_entries(file, header, data_size)
    if entries is None:  # some entry is invalid: checked one by one, the first bad one named
        entries = [_parse_entry(file, key, raw, data_size) for key, raw in header.items()]
    entries.sort(key=_BEGIN)
    _check_coverage(file, entries, data_size)
    return Header(entries=entries, data_start=8 + length)
