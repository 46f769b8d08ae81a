"""Where a checkpoint's files come from: what a path names (``resolve``) and its config (``load_config``).

Every entry point that takes a checkpoint path (loading, ``build_model``, ``inspect``, ``list --config``)
goes through :func:`resolve`, so a directory, a weights file, an index, a ``config.json`` path and a hub repo
id mean the same checkpoint everywhere. ``hub`` fetches a repo's files on demand into the Hugging Face cache;
``shared`` makes one rank per machine do it under ``torch.distributed``.
"""

from __future__ import annotations

from automodel_plugins.sources.config import config_path_of, load_config
from automodel_plugins.sources.hub import HubLocation, is_repo_id
from automodel_plugins.sources.options import HubOptions
from automodel_plugins.sources.resolve import (
    CONFIG_NAME,
    INDEX_NAME,
    SAFETENSORS_NAME,
    CheckpointLocation,
    LocalLocation,
    Weights,
    resolve,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SAFETENSORS_NAME",
    "CheckpointLocation",
    "HubLocation",
    "HubOptions",
    "LocalLocation",
    "Weights",
    "config_path_of",
    "is_repo_id",
    "load_config",
    "resolve",
]
