"""Where a checkpoint's files come from: what a path names (``resolve``) and its config (``load_config``).

Every entry point that takes a checkpoint path (loading, ``build_model``, ``inspect``, ``list --config``)
goes through :func:`resolve`, so a directory, a weights file, an index and a ``config.json`` path mean the
same checkpoint everywhere.
"""

from __future__ import annotations

from automodel_plugins.sources.config import config_path_of, load_config
from automodel_plugins.sources.resolve import (
    CONFIG_NAME,
    INDEX_NAME,
    SAFETENSORS_NAME,
    CheckpointLocation,
    Weights,
    resolve,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SAFETENSORS_NAME",
    "CheckpointLocation",
    "Weights",
    "config_path_of",
    "load_config",
    "resolve",
]
