"""What loading a checkpoint would do, told from ``config.json`` and the safetensors headers alone.

``describe_checkpoint`` resolves the claiming plugin, builds the model on the meta device and plans the load
with the plugin's adapter exactly as :func:`automodel_plugins.from_pretrained` would, but reads no tensor
data: the ``bytes_read`` it reports is the checkpoint reader's own counter, and stays 0.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins import fp8
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.config import load_config
from automodel_plugins.loading import model_tensors, plan_load
from automodel_plugins.pipeline import _adapter, build_model, resolve_dtype
from automodel_plugins.quantization import quantization_dict
from automodel_plugins.registry import Registry, get_registry, pick_winner

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from automodel_plugins.adapter import TensorSource

__all__ = ["describe_checkpoint"]

_QUANTIZATION_FIELDS = ("quant_method", "weight_block_size", "activation_scheme", "modules_to_not_convert")


def describe_checkpoint(
    path: str | Path, *, dtype: torch.dtype | None = None, registry: Registry | None = None
) -> dict[str, Any]:
    """A JSON-ready summary: config, claims and the winning plugin, files, and the planned load.

    ``load`` (present when a plugin claims the config; ``None`` means stock transformers would load it) holds
    the on-disk layout, FP8 granularity and scale names, how many model tensors come from FP8 data and how
    many are used as stored or converted, the dropped keys, and the bytes the model holds once loaded in
    ``dtype`` (default: the config's, else BF16). Raises what the load would raise for a config or a
    checkpoint it cannot plan (missing or unexpected keys, an FP8 weight without a scale, ...).
    """
    registry = registry or get_registry()
    config = load_config(path)
    verdicts = registry.claims(config)
    plugin = pick_winner(verdicts)
    target = resolve_dtype(config, dtype)
    with Checkpoint.open(path) as checkpoint:
        description: dict[str, Any] = {
            "path": str(checkpoint.directory),
            "config": _config_summary(config),
            "claims": [verdict.model_dump() for verdict in verdicts],
            "plugin": plugin,
            "plugin_version": registry.version(plugin) if plugin else None,
            "checkpoint": _checkpoint_summary(checkpoint),
            "load": _load_summary(registry, plugin, config, checkpoint, target) if plugin else None,
        }
        description["bytes_read"] = checkpoint.bytes_read
    return description


def _config_summary(config: PretrainedConfig) -> dict[str, Any]:
    """Model type, the text model's size, tying and the quantization the config declares."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quantization = quantization_dict(config)
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "text_model_type": getattr(text, "model_type", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": _dtype_name(getattr(config, "dtype", None)),
        "quantization": None
        if quantization is None
        else {k: quantization.get(k) for k in _QUANTIZATION_FIELDS},
    }


def _checkpoint_summary(checkpoint: Checkpoint) -> dict[str, Any]:
    """Files, tensor counts by dtype and sizes, from the headers."""
    dtypes = Counter(_dtype_name(checkpoint.info(key).dtype) for key in checkpoint)
    return {
        "files": [file.name for file in checkpoint.files],
        "index": checkpoint.index_path is not None,
        "tensors": len(checkpoint),
        "tensors_by_dtype": dict(sorted(dtypes.items())),
        "fp8_tensors": sum(fp8.is_fp8(checkpoint.info(key).dtype) for key in checkpoint),
        "tensor_bytes": checkpoint.total_nbytes(),
        "file_bytes": sum(file.stat().st_size for file in checkpoint.files),
    }


def _load_summary(
    registry: Registry, plugin: str, config: PretrainedConfig, checkpoint: Checkpoint, dtype: torch.dtype
) -> dict[str, Any]:
    """Plan the load on a meta model with the plugin's adapter and count what each tensor would go through."""
    model = build_model(config, dtype=dtype, registry=registry)
    targets = model_tensors(model)
    adapter = _adapter(registry, plugin, config, checkpoint)
    plan = plan_load(targets, adapter, checkpoint)
    adapter_info = adapter.describe()
    fp8_sources = [source for source in plan.values() if source.is_fp8]
    in_place = sum(_in_place(checkpoint, source, dtype) for source in plan.values())
    return {
        "adapter": adapter_info.get("adapter"),
        "layout": adapter_info.get("layout"),
        "granularity": adapter_info.get("granularity") if fp8_sources else None,
        "scale_names": adapter_info.get("scale_names", []),
        "dtype": _dtype_name(dtype),
        "model_tensors": len(plan),
        "fp8_tensors": len(fp8_sources),
        "non_fp8_tensors": len(plan) - len(fp8_sources),
        "used_in_place": in_place,
        "converted": len(plan) - len(fp8_sources) - in_place,
        "scale_keys": len(fp8_sources),
        "dropped_keys": sum(len(source.dropped_keys) for source in plan.values()),
        "bytes_after_load": sum(
            targets[name].numel() * _loaded_dtype(checkpoint, source, dtype).itemsize
            for name, source in plan.items()
        ),
        "forward_overridden": model.automodel_composition.forward_overridden,
    }


def _loaded_dtype(checkpoint: Checkpoint, source: TensorSource, dtype: torch.dtype) -> torch.dtype:
    """What the loader turns a source into: floats (FP8 included) become ``dtype``, other dtypes stay."""
    stored = checkpoint.info(source.key).dtype
    return dtype if source.is_fp8 or stored.is_floating_point else stored


def _in_place(checkpoint: Checkpoint, source: TensorSource, dtype: torch.dtype) -> bool:
    """A non-FP8 tensor stored in the dtype it loads in: memory-mapped as it is, never copied."""
    return not source.is_fp8 and checkpoint.info(source.key).dtype == _loaded_dtype(checkpoint, source, dtype)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
