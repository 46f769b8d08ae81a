"""What every checkpoint location is (:class:`CheckpointLocation`: a local directory or a hub repo) and the
file names a checkpoint is made of; below both kinds of location and the resolver that picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "NATIVE_INDEX_NAME",
    "NATIVE_SAFETENSORS_NAME",
    "PARAMS_NAME",
    "SAFETENSORS_NAME",
    "CheckpointLocation",
    "Weights",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_NAME = "model.safetensors"
PARAMS_NAME = "params.json"
"""Mistral's native config (translated by :mod:`automodel_plugins.sources.native`)."""
NATIVE_INDEX_NAME = "consolidated.safetensors.index.json"
NATIVE_SAFETENSORS_NAME = "consolidated.safetensors"
"""Mistral's native weights: one file, or ``consolidated-0000X-of-0000N.safetensors`` listed by the index."""


@dataclass(frozen=True)
class Weights:
    """Where the tensors are: an index naming shard files, or one safetensors file (exactly one is set)."""

    index: Path | None = None
    file: Path | None = None


class CheckpointLocation(ABC):
    """Where a checkpoint's files are: a local directory (:class:`LocalLocation`) or a hub repo
    (:class:`~automodel_plugins.sources.hub.HubLocation`, whose files are fetched into the Hugging Face cache
    only when asked for).

    ``given`` is what the user passed; ``directory`` holds the files (for a repo, its cache snapshot);
    ``named_weights`` is the index or weights file the user named, if any. Code that reads a checkpoint asks
    for files by name through :meth:`config_file`, :meth:`weights` and :meth:`file`, and so takes repo ids
    for free.
    """

    given: str
    named_weights: Path | None

    @property
    @abstractmethod
    def directory(self) -> Path:
        """The local directory that holds (or, for a repo, will hold) the checkpoint's files."""

    @property
    def config(self) -> Path:
        """Where the ``config.json`` is (or will be once fetched); :meth:`config_file` checks it exists."""
        return self.directory / CONFIG_NAME

    @property
    def is_native(self) -> bool:
        """Whether the checkpoint is in Mistral's native form (``params.json`` and no ``config.json``: where
        both are present, the HF form wins, as in transformers and vLLM's default)."""
        return self.config.name == PARAMS_NAME

    @property
    def is_remote(self) -> bool:
        """True for a hub repo: files may have to be fetched (and can be described from their headers)."""
        return False

    @abstractmethod
    def config_file(self) -> Path:
        """The local ``config.json`` (fetched if needed); :class:`ConfigError` names what is missing."""

    @abstractmethod
    def has_config(self) -> bool:
        """Whether the checkpoint has a ``config.json``."""

    @abstractmethod
    def weights(self) -> Weights:
        """The index (a local file) or the one weights file (its local path, fetched by :meth:`file`)."""

    @abstractmethod
    def file(self, name: str) -> Path:
        """The local path of ``name``, a file the index lists (or the weights file), fetched if needed."""

    def is_local(self, name: str) -> bool:
        """Whether ``name`` can be read without fetching it."""
        return True

    def fetch(self, names: Iterable[str]) -> None:
        """Make every file of ``names`` local (one download per machine); a local checkpoint has them all."""
        return None

    def header_bytes(self, names: Iterable[str]) -> dict[str, tuple[bytes, int]]:
        """For each file of ``names`` that is not local: its first ``8 + header length`` bytes and its size,
        read without fetching the file (range requests). A local checkpoint has nothing to add."""
        return {}

    def size(self, name: str) -> int:
        """Bytes of the file ``name`` (for a repo file not fetched yet: as the hub reports it)."""
        return self.file(name).stat().st_size
