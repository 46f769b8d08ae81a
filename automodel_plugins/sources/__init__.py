"""Where a checkpoint's files come from: what a path names (``resolve``) and its config (``load_config``).

Every entry point that takes a checkpoint path (loading, ``build_model``, ``inspect``, ``list --config``)
goes through :func:`resolve`, so a directory, a weights file, an index, a ``config.json`` path and a hub repo
id mean the same checkpoint everywhere.

* ``location``: what every location is (``CheckpointLocation``) and the file names of a checkpoint;
* ``options``: ``HubOptions``, the hub options as one value, built once by each entry point;
* ``hub``: ``HubLocation``, a repo's files fetched on demand into the Hugging Face cache;
* ``hub_guard``: what a hub's answers may not decide (a commit or ETag naming a path), and the bounds on every
  wait and body while this package talks to a hub;
* ``hub_space``: the room a fetch still needs on the cache's disk, checked before a file's body is requested;
* ``shared``: one rank per machine does such work under ``torch.distributed`` while the others wait;
* ``head``: a safetensors header's length, bounded, from a file's first 8 bytes (local or by range request);
* ``resolve``: what a path or repo id names (``LocalLocation`` or ``HubLocation``);
* ``config``: ``load_config``; ``schema``: the config fields checked before transformers sees them;
* ``native``: Mistral's native ``params.json`` translated, field by field, into the config it describes;
* ``native_params``: the way back, a transformers config written as the ``params.json`` it stands for;
* ``compressed_tensors``: compressed-tensors' (llm-compressor's) FP8 ``quantization_config`` read as the FP8
  settings the host applies (no torch): one reading for a ``config.json`` and a ``params.json``.
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
