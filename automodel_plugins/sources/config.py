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
from automodel_plugins.sources.native import PARAMS_NAME, translate_params
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
    is not an object, a missing or unknown top-level ``model_type``, a size, head count or rotary parameter no
    model can be built with (see :mod:`automodel_plugins.sources.schema`), or a config transformers refuses.

    A nested ``model_type`` is transformers' to judge: its config classes accept published values that are not
    in its list (Kimi-K2.5's ``text_config.model_type: "kimi_k2"``, which ``Kimi_K25Config`` rewrites to
    ``deepseek_v3``; Qwen3-Omni's ``code2wav_config.model_type: ""``). Only when transformers refuses the
    config are the nested ``model_type`` fields it does not know named in the error.
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
    if (
        file.name == PARAMS_NAME
    ):  # Mistral's native form: translated field by field, then checked as any config
        data = translate_params(data, file)
    _check_model_type(file, data, "model_type", required=True)
    problems = config_problems(data)
    if problems:
        raise ConfigError(file, "; ".join(problems))
    from transformers import AutoConfig

    # A file named config.json is loaded through its directory, so name_or_path is the model directory.
    source = file.parent if file.name == CONFIG_NAME else file
    try:
        if file.name == PARAMS_NAME:
            fields = {k: v for k, v in data.items() if k != "model_type"}
            config = AutoConfig.for_model(data["model_type"], **fields)
            config.name_or_path = str(file.parent)
        else:
            config = AutoConfig.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(file, _refusal(data, exc)) from exc
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


def _refusal(data: dict[str, Any], exc: Exception) -> str:
    """Why transformers refused ``data``: the nested ``model_type`` fields it does not know and names in its
    error first (its own message lists every model type it has, but not the field), then its error, cut
    short. A nested type transformers did not complain about (``""`` in Qwen3-Omni) is not blamed."""
    said = f"{type(exc).__name__}: {exc}"
    unknown = []
    for field, value in _nested_model_types(data):
        if str(value) and str(value) in said:
            try:
                _check_model_type(None, {"model_type": value}, field, required=True)
            except ConfigError as error:
                unknown.append(str(error))
    said = said if len(said) <= _MAX_QUOTED else said[:_MAX_QUOTED] + "..."
    return f"transformers cannot build this config: {'; '.join([*unknown, said])}"


_MAX_QUOTED = 300
"""Characters of transformers' own message quoted in a refusal (its unknown-type message lists ~600 names)."""


def _nested_model_types(data: dict[str, Any], where: str = "") -> list[tuple[str, Any]]:
    """``(dotted field, value)`` of every ``model_type`` below the top level (``text_config.model_type``,
    ``thinker_config.audio_config.model_type``, ...); depth is bounded by :data:`MAX_CONFIG_DEPTH`."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            field = f"{where}{key}"
            if "model_type" in value:
                found.append((f"{field}.model_type", value["model_type"]))
            found += _nested_model_types(value, f"{field}.")
    return found


def _check_model_type(file: Path | None, data: dict[str, Any], field: str, *, required: bool) -> None:
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
