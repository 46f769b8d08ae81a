"""The one place that decides what a checkpoint source names: its directory, its ``config.json``, its weights.

A user may pass a model directory, a single ``.safetensors`` file, a ``*.index.json`` file, a ``config.json``
path or a Hugging Face Hub repo id; config loading, checkpoint reading, ``inspect`` and ``list --config`` all go
through :func:`resolve`, so they never disagree about which file is the config and which are the weights.
Nothing here reads tensor data or parses JSON: headers and the index are the checkpoint reader's business.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from automodel_plugins.errors import CheckpointError, ConfigError, SourceNotFoundError
from automodel_plugins.sources.hub import HubLocation, is_repo_id
from automodel_plugins.sources.location import (
    CONFIG_NAME,
    INDEX_NAME,
    NATIVE_INDEX_NAME,
    NATIVE_SAFETENSORS_NAME,
    PARAMS_NAME,
    SAFETENSORS_NAME,
    CheckpointLocation,
    Weights,
)
from automodel_plugins.sources.options import HubOptions

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SAFETENSORS_NAME",
    "CheckpointLocation",
    "LocalLocation",
    "Weights",
    "not_a_file",
    "read_regular_file",
    "resolve",
]

_INDEX_SUFFIX = ".index.json"
_SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LocalLocation(CheckpointLocation):
    """A checkpoint on local disk as the user named it.

    ``config`` is the ``config.json`` to read (the named file, else the directory's); ``named_weights`` is the
    index or safetensors file the user named, ``None`` when a directory (or a config file) was named and the
    weights are the directory's own.
    """

    given: str
    local_directory: Path
    config_path: Path
    named_weights: Path | None = None

    @property
    def directory(self) -> Path:
        return self.local_directory

    @property
    def config(self) -> Path:
        return self.config_path

    def config_file(self) -> Path:
        """The ``config.json`` path, checked to exist; :class:`ConfigError` names what is missing."""
        if self.config.is_file():
            return self.config
        if self.config.exists():
            raise ConfigError(self.config, not_a_file(self.config) or "cannot be read")
        if self.named_weights is None and self.config.parent == self.directory:
            raise ConfigError(
                self.directory, f"no {CONFIG_NAME} in this directory (nor Mistral's {PARAMS_NAME})"
            )
        raise ConfigError(self.config, f"no {CONFIG_NAME} beside the named weights")

    def has_config(self) -> bool:
        return self.config.is_file()

    def weights(self) -> Weights:
        """The named index or file; else the directory's index; else its one ``*.safetensors`` file.

        In a directory without an index, ``model.safetensors`` wins; several other candidates are ambiguous.
        """
        if self.named_weights is not None:
            if self.named_weights.name.endswith(_INDEX_SUFFIX):
                return Weights(index=self.named_weights)
            return Weights(file=self.named_weights)
        if self.is_native:
            return _native_weights(self.directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            return Weights(index=index)  # read (and refused if it is no file) by the index reader
        return Weights(file=_single_file_in(self.directory))

    def file(self, name: str) -> Path:
        """The local path of ``name`` (a file name an index lists) in this checkpoint's directory."""
        return self.directory / name


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_a_file(path: Path, mode: int | None = None) -> str | None:
    """Why ``path`` cannot be read as a file: ``"does not exist"``, ``"is a directory"``, ``"is a FIFO ..."``;
    ``None`` for a regular file. ``mode`` (an ``st_mode`` already at hand, say from ``fstat``) skips the stat.

    A directory or a named pipe where a weights file is expected deserves its name: "does not exist" would send
    the user looking for a file that is there, and opening a FIFO would block the load forever.
    """
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return "does not exist"
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
            return f"cannot be read: {exc}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a file"


def read_regular_file(path: Path) -> bytes:
    """The whole content of the regular file ``path``; :class:`OSError` saying what it is otherwise.

    Opened without blocking and checked on the open file, so a FIFO put in a file's place never hangs the read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        reason = not_a_file(path, os.fstat(fd).st_mode)
        if reason is not None:
            raise OSError(f"{path.name} {reason}")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def resolve(source: str | Path | CheckpointLocation, options: HubOptions | None = None) -> CheckpointLocation:
    """What ``source`` names: a model directory, a ``.safetensors`` file, a ``*.index.json`` or a ``.json``
    config on disk; else a Hugging Face Hub repo id (``org/name``), as transformers decides: an existing local
    path always wins over a repo id of the same spelling. A location passes through unchanged.

    ``options`` (:class:`~automodel_plugins.sources.options.HubOptions`) apply to repo ids only.

    Raises :class:`SourceNotFoundError` (a ``ConfigError`` and a ``CheckpointError``) when a path does not
    exist and is no repo id, and :class:`CheckpointError` for a file of another kind (``pytorch_model.bin``).
    """
    if isinstance(source, CheckpointLocation):
        return source
    path = Path(source)
    if "\0" in str(source):
        raise SourceNotFoundError(path, "a path cannot contain a NUL byte")
    if not path.exists():
        if isinstance(source, str) and is_repo_id(source):
            return HubLocation(source, options or HubOptions())
        raise SourceNotFoundError(path)
    return _local(str(source), path)


def _local(given: str, path: Path) -> LocalLocation:
    if path.is_dir():
        directory = path.resolve()
        return LocalLocation(given, directory, _config_in(directory))
    directory = path.parent.resolve()
    named = directory / path.name
    if path.name.endswith((_INDEX_SUFFIX, _SAFETENSORS_SUFFIX)):
        return LocalLocation(given, directory, _config_in(directory), named_weights=named)
    if path.suffix == ".json":
        return LocalLocation(given, directory, named)
    raise CheckpointError(
        "not a checkpoint directory, a .safetensors file, a *.index.json index or a config.json", path=path
    )


def _config_in(directory: Path) -> Path:
    """``config.json``; in a directory without one but with Mistral's ``params.json``, that (native form)."""
    config = directory / CONFIG_NAME
    if not config.exists() and (directory / PARAMS_NAME).is_file():
        return directory / PARAMS_NAME
    return config


def _native_weights(directory: Path) -> Weights:
    """Mistral's native weights: ``consolidated.safetensors.index.json`` (its shards named
    ``consolidated-0000X-of-0000N.safetensors``), else the one ``consolidated.safetensors``."""
    index = directory / NATIVE_INDEX_NAME
    if index.exists():
        return Weights(index=index)
    single = directory / NATIVE_SAFETENSORS_NAME
    if single.exists():
        return Weights(file=single)
    raise CheckpointError(
        f"{PARAMS_NAME} without {CONFIG_NAME} (Mistral's native form), but neither {NATIVE_INDEX_NAME} nor "
        f"{NATIVE_SAFETENSORS_NAME}",
        path=directory,
    )


def _single_file_in(directory: Path) -> Path:
    """The one safetensors file of an unindexed directory (``model.safetensors`` wins if present)."""
    preferred = directory / SAFETENSORS_NAME
    if preferred.is_file():
        return preferred
    if preferred.exists():
        raise CheckpointError(f"{SAFETENSORS_NAME} {not_a_file(preferred)}", path=preferred)
    candidates = sorted(p for p in directory.glob(f"*{_SAFETENSORS_SUFFIX}") if p.is_file())
    if not candidates:
        raise CheckpointError("no *.safetensors file and no index in checkpoint directory", path=directory)
    if len(candidates) > 1:
        raise CheckpointError(
            f"{len(candidates)} *.safetensors files but no {INDEX_NAME} to say which to use: "
            + ", ".join(p.name for p in candidates),
            path=directory,
        )
    return candidates[0]
