"""The length of a safetensors header from a file's first 8 bytes, bounded before anything is allocated.

Below the checkpoint reader on purpose: the hub client asks for a remote file's head by two range requests and
must check the length the first one gives before it asks for the second, without importing torch.
"""

from __future__ import annotations

import struct
from pathlib import Path

from automodel_plugins.errors import CorruptCheckpointError

__all__ = ["MAX_HEADER_BYTES", "header_length"]

# safetensors refuses headers above 100 MB; refusing them here keeps a hostile length from allocating.
MAX_HEADER_BYTES = 100_000_000


def header_length(file: Path, prefix: bytes, file_size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file size and the limit."""
    if file_size < 8 or len(prefix) < 8:
        raise CorruptCheckpointError(
            f"file is {file_size} bytes, too short for a safetensors header", path=file
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > file_size - 8:
        raise CorruptCheckpointError(
            f"header length {length} exceeds the file size ({file_size} bytes): truncated or not safetensors",
            path=file,
        )
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit", path=file
        )
    return length
