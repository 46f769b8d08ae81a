"""What loading a checkpoint would do, told from ``config.json`` and the safetensors headers alone.

``describe_checkpoint`` resolves the claiming plugin, builds the model on the meta device and plans the load
with the plugin's adapter exactly as :func:`automodel_plugins.from_pretrained` would, but reads no tensor
data: the ``bytes_read`` it reports is the checkpoint reader's own counter, and stays 0. For a hub repo id the
headers of shards not in the cache come from HTTP range requests, so nothing but ``config.json``, the index
and the headers is downloaded.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import ConfigError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.composition import adapter_for
from automodel_plugins.pipeline.load.load import build_model, resolve_dtype
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.load.preflight import check_stock_path, check_structure
from automodel_plugins.pipeline.load.resident import plan_resident
from automodel_plugins.registry import Registry, get_registry, pick_winner
from automodel_plugins.sources import (
    CheckpointLocation,
    HubLocation,
    HubOptions,
    compressed_tensors,
    load_config,
    resolve,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["describe_checkpoint"]

_ADAPTER_SUMMARY = ("adapter", "layout", "granularity", "scale_names")
_QUANTIZATION_FIELDS = ("quant_method", "weight_block_size", "activation_scheme", "modules_to_not_convert")


def describe_checkpoint(
    path: str | Path | CheckpointLocation,
    *,
    dtype: torch.dtype | None = None,
    registry: Registry | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary: config, claims and the winning plugin, files, and the planned load.

    ``path`` may be a hub repo id (hub options as in :func:`automodel_plugins.from_pretrained`): then only
    ``config.json`` and the index are downloaded, the shards' headers are read with range requests, and
    ``hub`` says what a load would download (and what it leaves on the hub, e.g. ``consolidated.safetensors``).

    ``load`` (present when a plugin claims the config; ``None`` means stock transformers would load it) holds
    the on-disk layout, FP8 granularity and scale names, how many model tensors come from FP8 data and how
    many are used as stored or converted, the dropped keys, and the bytes the model holds once loaded in
    ``dtype`` (default: the config's, else BF16): ``bytes_after_load`` dequantized (the default load), and
    ``bytes_after_load_fp8_resident`` with ``dequantize=False`` (FP8 codes + fp32 scales of the
    ``fp8_resident_layers`` tensors, linear weights and fused MoE experts, + every other tensor; ``None`` when
    nothing can stay FP8), and ``fp8_not_resident``, the FP8 tensors such a load still dequantizes (neither
    ``nn.Linear`` weights nor block-aligned block-FP8 fused experts). Tensors assembled from several checkpoint tensors are counted in
    ``assembled_tensors``, their checkpoint tensors in ``pieces``; ``scale_keys`` counts every FP8 scale read.
    ``adapter_details`` holds what the adapter describes beyond layout, granularity and scale names. Raises what
    the load would raise for a config or a checkpoint it cannot plan (a config the headers contradict, missing
    or unexpected keys, wrong shapes or dtypes, an FP8 weight without a fitting scale, FP8 tensors the stock
    path would not scale, ...).
    """
    registry = registry or get_registry()
    options = HubOptions(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        progress=progress,
    )
    location = resolve(path, options)
    config = load_config(location)
    verdicts = registry.claims(config)
    plugin = pick_winner(verdicts)
    target = resolve_dtype(config, dtype)
    with Checkpoint.open(location, download=False) as checkpoint:
        check_structure(config, checkpoint)
        if plugin is None:
            check_stock_path(config, checkpoint)
        description: dict[str, Any] = {
            "path": str(checkpoint.directory),
            "hub": _hub_summary(location, checkpoint) if isinstance(location, HubLocation) else None,
            "config": _config_summary(config),
            "claims": [verdict.model_dump() for verdict in verdicts],
            "plugin": plugin,
            "plugin_version": registry.version(plugin) if plugin else None,
            "checkpoint": _checkpoint_summary(checkpoint, location),
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
        "quantization": None if quantization is None else _quantization_summary(quantization),
    }


def _quantization_summary(quantization: dict[str, Any]) -> dict[str, Any]:
    """The declared quantization's fields; a compressed-tensors dict's as the host reads them (block size,
    activation scheme, modules named in ``ignore``), its method kept; one it cannot read as written."""
    if quantization.get("quant_method") == compressed_tensors.METHOD:
        try:
            read = compressed_tensors.translate_compressed_tensors(quantization, path=None)
        except ConfigError:
            pass
        else:
            quantization = {**read, "quant_method": compressed_tensors.METHOD}
    return {k: quantization.get(k) for k in _QUANTIZATION_FIELDS}


def _hub_summary(location: HubLocation, checkpoint: Checkpoint) -> dict[str, Any]:
    """The repo and commit, the files a load reads and the bytes it downloads, and what it leaves on the hub."""
    read = [location.config.name]  # params.json for a native-only repo
    if checkpoint.index_path is not None:
        read.append(checkpoint.index_path.name)
    read += [file.name for file in checkpoint.files]
    sizes = {name: location.size(name) for name in read}
    cached = sum(size for name, size in sizes.items() if location.is_local(name))
    listing = location.repo_files()
    return {
        "repo_id": location.repo_id,
        "revision": location.options.revision,
        "commit": location.commit,
        "files_read": read,
        "load_bytes": sum(sizes.values()),
        "cached_bytes": cached,
        "download_bytes": sum(sizes.values()) - cached,
        "repo_bytes": None if listing is None else sum(listing.values()),
        "not_downloaded": None
        if listing is None
        else {name: size for name, size in sorted(listing.items()) if name not in sizes},
    }


def _checkpoint_summary(checkpoint: Checkpoint, location: CheckpointLocation) -> dict[str, Any]:
    """Files, tensor counts by dtype and sizes, from the headers."""
    by_dtype = Counter(info.dtype for info in checkpoint.infos())
    dtypes = Counter({_dtype_name(dtype): count for dtype, count in by_dtype.items()})
    return {
        "files": [file.name for file in checkpoint.files],
        "index": checkpoint.index_path is not None,
        "tensors": len(checkpoint),
        "tensors_by_dtype": dict(sorted(dtypes.items())),
        "fp8_tensors": sum(count for dtype, count in by_dtype.items() if is_fp8(dtype)),
        "tensor_bytes": checkpoint.total_nbytes(),
        "file_bytes": sum(checkpoint.file_size(file) for file in checkpoint.files),
    }


def _load_summary(
    registry: Registry, plugin: str, config: PretrainedConfig, checkpoint: Checkpoint, dtype: torch.dtype
) -> dict[str, Any]:
    """Plan the load on a meta model with the plugin's adapter and count what each tensor would go through."""
    model = build_model(config, dtype=dtype, registry=registry)
    targets = model_tensors(model)
    adapter = adapter_for(registry, plugin, config, checkpoint)
    # The adapter is asked, and its answers checked against the headers, once for both plans.
    sources, checked = {name: adapter.from_hf(name) for name in targets}, set[str]()
    plan = plan_load(targets, adapter, checkpoint, sources=sources, checked=checked)
    resident = plan_resident(model, targets, adapter, checkpoint, sources=sources, checked=checked)
    kept = sum(planned.action == "kept_fp8" for planned in resident.values())
    adapter_info = adapter.describe()
    actions = Counter(planned.action for planned in plan.values())
    return {
        "adapter": adapter_info.get("adapter"),
        "layout": adapter_info.get("layout"),
        "granularity": adapter_info.get("granularity") if actions["dequantized"] else None,
        "scale_names": adapter_info.get("scale_names", []),
        "adapter_details": {k: v for k, v in adapter_info.items() if k not in _ADAPTER_SUMMARY},
        "dtype": _dtype_name(dtype),
        "model_tensors": len(plan),
        "fp8_tensors": actions["dequantized"],
        "non_fp8_tensors": len(plan) - actions["dequantized"],
        "used_in_place": actions["used_in_place"],
        "converted": actions["converted"],
        "assembled_tensors": sum(planned.pieces > 0 for planned in plan.values()),
        "pieces": sum(planned.pieces for planned in plan.values()),
        "scale_keys": sum(piece.is_fp8 for planned in plan.values() for piece in planned.source.parts()),
        "dropped_keys": sum(len(planned.source.dropped_keys) for planned in plan.values()),
        "bytes_after_load": sum(planned.resident_bytes for planned in plan.values()),
        "fp8_resident_layers": kept,
        "bytes_after_load_fp8_resident": sum(p.resident_bytes for p in resident.values()) if kept else None,
        "fp8_not_resident": sum(planned.action == "dequantized" for planned in resident.values())
        if kept
        else None,
        "forward_overridden": model.automodel_composition.forward_overridden,
    }


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
