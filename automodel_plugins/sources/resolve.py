"""The one place that decides what a checkpoint path names: its directory, its ``config.json``, its weights.

A user may pass a model directory, a single ``.safetensors`` file, a ``*.index.json`` file or a ``config.json``
path; config loading, checkpoint reading, ``inspect`` and ``list --config`` all go through :func:`resolve`, so
they never disagree about which file is the config and which are the weights. Nothing here reads tensor data
or parses JSON: headers and the index are the checkpoint reader's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from automodel_plugins.errors import CheckpointError, ConfigError, SourceNotFoundError

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SAFETENSORS_NAME",
    "CheckpointLocation",
    "Weights",
    "resolve",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_NAME = "model.safetensors"
_INDEX_SUFFIX = ".index.json"
_SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Weights:
    """Where the tensors are: an index naming shard files, or one safetensors file (exactly one is set)."""

    index: Path | None = None
    file: Path | None = None


@dataclass(frozen=True)
class CheckpointLocation:
    """A checkpoint on local disk as the user named it.

    ``directory`` holds its files; ``config`` is the ``config.json`` to read (the named file, else the
    directory's); ``named_weights`` is the index or safetensors file the user named, ``None`` when a directory
    (or a config file) was named and the weights are the directory's own.
    """

    given: str
    directory: Path
    config: Path
    named_weights: Path | None = None

    def config_file(self) -> Path:
        """The ``config.json`` path, checked to exist; :class:`ConfigError` names what is missing."""
        if self.config.is_file():
            return self.config
        if self.named_weights is None and self.config.parent == self.directory:
            raise ConfigError(self.directory, f"no {CONFIG_NAME} in this directory")
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
        index = self.directory / INDEX_NAME
        if index.is_file():
            return Weights(index=index)
        return Weights(file=_single_file_in(self.directory))

    def file(self, name: str) -> Path:
        """The local path of ``name`` (a file name an index lists) in this checkpoint's directory."""
        return self.directory / name


def resolve(path: str | Path) -> CheckpointLocation:
    """What ``path`` names: a model directory, a ``.safetensors`` file, a ``*.index.json`` or a ``.json`` config.

    Raises :class:`SourceNotFoundError` (a ``ConfigError`` and a ``CheckpointError``) when it does not exist,
    and :class:`CheckpointError` for a file of another kind (``pytorch_model.bin``, ...).
    """
    given = str(path)
    path = Path(path)
    if not path.exists():
        raise SourceNotFoundError(path)
    if path.is_dir():
        directory = path.resolve()
        return CheckpointLocation(given, directory, directory / CONFIG_NAME)
    directory = path.parent.resolve()
    named = directory / path.name
    if path.name.endswith((_INDEX_SUFFIX, _SAFETENSORS_SUFFIX)):
        return CheckpointLocation(given, directory, directory / CONFIG_NAME, named_weights=named)
    if path.suffix == ".json":
        return CheckpointLocation(given, directory, named)
    raise CheckpointError(
        "not a checkpoint directory, a .safetensors file, a *.index.json index or a config.json", path=path
    )


def _single_file_in(directory: Path) -> Path:
    """The one safetensors file of an unindexed directory (``model.safetensors`` wins if present)."""
    preferred = directory / SAFETENSORS_NAME
    if preferred.is_file():
        return preferred
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
