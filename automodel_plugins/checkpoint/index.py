"""The safetensors index (``model.safetensors.index.json``): which shard file holds each tensor.

Every ``weight_map`` entry must be a plain file name that stays inside the checkpoint directory (or, for a
Hugging Face cache snapshot, inside the cache's blob store): an index is user input, and a path that escapes
the checkpoint is refused rather than read.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path

from automodel_plugins.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointPathError
from automodel_plugins.sources.resolve import CheckpointLocation, not_a_file, read_regular_file

__all__ = ["link_leads_outside", "load_weight_map", "shard_files", "shard_names"]


def _allowed_roots(directory: Path) -> list[Path]:
    """Where index entries may resolve: the checkpoint directory, plus the blob store of a Hugging Face
    cache snapshot (``models--org--name/snapshots/<rev>/`` links every file into ``../../blobs/``)."""
    roots = [directory]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append(directory.parent.parent / "blobs")
    return roots


def _is_within(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def link_leads_outside(directory: Path, file: Path) -> Path | None:
    """Where ``file`` of the checkpoint in ``directory`` leads once its links are followed, when that is outside
    the checkpoint (and, for a cache snapshot, outside the cache's blob store); ``None`` when it stays inside.
    The one rule for every file read or copied from a checkpoint: a link may not lead outside it."""
    resolved = file.resolve()
    return None if any(_is_within(resolved, root) for root in _allowed_roots(directory)) else resolved


def _check_entry_name(index: Path, key: str, name: str) -> None:
    """A weight_map file name must be a plain relative name: no absolute path, no ``..``, no NUL, no
    backslash."""
    if "\0" in name:
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} contains a NUL byte: no file has such a name", path=index, key=key
        )
    if "\\" in name:
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} contains a backslash: a path separator on Windows (and to "
            "huggingface_hub), never part of a shard's plain file name",
            path=index,
            key=key,
        )
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name in ("", "."):
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} is not a plain file name inside the checkpoint directory",
            path=index,
            key=key,
        )


def _check_within(location: CheckpointLocation, index: Path, key: str, name: str, file: Path) -> Path:
    """``file`` as the index names it, once its links are followed and found to stay inside the checkpoint
    (refused otherwise: a hostile link). The named path is kept, so errors and ``inspect`` show the names."""
    resolved = link_leads_outside(location.directory, file)
    if resolved is not None:
        raise UnsafeCheckpointPathError(
            f"weight_map entry {name!r} resolves to {resolved}, outside the checkpoint directory "
            f"{location.directory}",
            path=index,
            key=key,
        )
    return file


def load_weight_map(index: Path) -> dict[str, str]:
    """Parse the index JSON and return its weight_map (tensor key -> file name)."""
    try:
        data = json.loads(read_regular_file(index).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read index: {exc}", path=index) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"index is not valid JSON: {exc}", path=index) from exc
    except RecursionError as exc:
        raise CorruptCheckpointError("index JSON is nested too deeply to parse", path=index) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError("index has no 'weight_map' object", path=index)
    if set(map(type, weight_map.values())) <= {str}:  # checked in C; else the first other value is named
        return weight_map
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CorruptCheckpointError(f"weight_map value {name!r} is not a file name", path=index, key=key)
    return weight_map


def shard_names(index: Path) -> dict[str, set[str]]:
    """The shard file names the index lists (checked to be plain names) and the keys it assigns to each."""
    keys_by_name: dict[str, set[str]] = {}
    for key, name in load_weight_map(index).items():
        keys = keys_by_name.get(name)
        if keys is None:  # each name is checked once, naming the first key that lists it
            _check_entry_name(index, key, name)
            keys_by_name[name] = keys = set()
        keys.add(key)
    return keys_by_name


def shard_files(
    location: CheckpointLocation,
    index: Path,
    *,
    remote: Collection[str] = (),
    names: Mapping[str, set[str]] | None = None,
) -> tuple[tuple[Path, ...], dict[Path, set[str]]]:
    """Shard files named by the index (ordered by name) and the keys it assigns to each.

    Local shards are checked to exist inside the checkpoint; those in ``remote`` (a hub repo's shards not
    downloaded yet) are where their download will land. ``names`` is :func:`shard_names` of ``index`` when
    the caller already has it (the index is then not parsed again).
    """
    assigned: dict[Path, set[str]] = {}
    for name, keys in sorted((shard_names(index) if names is None else names).items()):
        if name in remote:
            file = location.directory / name
        else:
            file = _check_within(location, index, min(keys), name, location.file(name))
            reason = not_a_file(file)
            if reason is not None:
                raise CheckpointError(f"shard {name!r} named by {index.name} {reason}", path=file)
        assigned.setdefault(file, set()).update(keys)
    return tuple(assigned), assigned
