"""Read a model's ``config.json`` into a transformers config, with errors that name the file and the field.

transformers' own errors for a bad config are a ``JSONDecodeError`` without the path, or a long hint to upgrade;
this module checks the JSON first so the user learns which file and which field is wrong. For a hub repo id only
``config.json`` is fetched (through :mod:`automodel_plugins.sources.hub`); transformers itself never reaches the
hub from here, and code shipped with a checkpoint is never run. transformers is imported on call, not at import.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automodel_plugins.errors import ConfigError
from automodel_plugins.sources.options import HubOptions
from automodel_plugins.sources.resolve import CONFIG_NAME, CheckpointLocation, read_regular_file, resolve
from automodel_plugins.sources.schema import config_problems

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def load_config(
    path: str | Path | CheckpointLocation,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    progress: bool | None = None,
) -> PretrainedConfig:
    """Load the config of a checkpoint: a model directory, a weights file or index inside one, a
    ``config.json`` path, or a hub repo id (its ``config.json`` alone is fetched; the options go to
    :func:`~automodel_plugins.sources.resolve`; ``progress`` switches the download bar).

    Raises :class:`ConfigError` naming the file (and the field) for a missing file, malformed JSON, a value that
    is not an object, a missing or unknown ``model_type`` (also in nested ``*_config`` objects), or a size,
    head count or rotary parameter no model can be built with (see :mod:`automodel_plugins.sources.schema`).
    """
    options = HubOptions(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        progress=progress,
    )
    location = resolve(path, options)
    file = location.config_file()
    data = _read_object(file)
    _check_model_types(file, data)
    problems = config_problems(data)
    if problems:
        raise ConfigError(file, "; ".join(problems))
    from transformers import AutoConfig

    # A file named config.json is loaded through its directory, so name_or_path is the model directory.
    source = file.parent if file.name == CONFIG_NAME else file
    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(
            file, f"transformers cannot build this config: {type(exc).__name__}: {exc}"
        ) from exc
    if location.is_remote:  # as transformers names it, so PEFT adapters and model cards name the repo
        config.name_or_path = location.given
    return config


MAX_CONFIG_DEPTH = 32
"""Nesting deeper than this is no model config (real ones nest 3 or 4 levels); refused before transformers, whose
copies and comparisons of a config recurse through it, runs out of stack on it."""


def config_path_of(config: Any) -> Path | None:
    """The ``config.json`` a loaded config came from (its ``name_or_path`` directory's), when it still exists."""
    where = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not where:
        return None
    candidate = Path(where)
    candidate = candidate / CONFIG_NAME if candidate.is_dir() else candidate
    return candidate if candidate.is_file() else None


def _read_object(file: Path) -> dict[str, Any]:
    try:
        text = read_regular_file(file).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, f"cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(file, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise ConfigError(file, "JSON nested too deeply to parse") from exc
    if not isinstance(data, dict):
        raise ConfigError(file, f"expected a JSON object, got a JSON {_json_kind(data)}")
    field = _too_deep(data, MAX_CONFIG_DEPTH)
    if field is not None:
        shown = field if len(field) <= 60 else field[:60] + "..."
        raise ConfigError(file, f"field {shown!r} is nested more than {MAX_CONFIG_DEPTH} levels deep")
    return data


def _too_deep(value: Any, limit: int, path: str = "") -> str | None:
    """The dotted path of the first value nested deeper than ``limit`` levels, else None (iterative: no
    recursion limit of our own to hit)."""
    stack = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > limit:
            return where or "<root>"
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
    return None


def _check_model_types(file: Path, data: dict[str, Any]) -> None:
    """Check the top-level ``model_type`` and those of nested sub-configs (``text_config`` and the like)."""
    _check_model_type(file, data, "model_type", required=True)
    for key, value in data.items():
        if isinstance(value, dict) and "model_type" in value:
            _check_model_type(file, value, f"{key}.model_type", required=False)


def _check_model_type(file: Path, data: dict[str, Any], field: str, *, required: bool) -> None:
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type is None and not required:
        return
    if model_type is None:
        raise ConfigError(file, f"missing field {field!r}")
    if not isinstance(model_type, str):
        raise ConfigError(file, f"field {field!r} must be a string, got a JSON {_json_kind(model_type)}")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            file,
            f"unknown model_type {model_type!r} in field {field!r} (transformers {transformers_version}){hint}",
        )


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
