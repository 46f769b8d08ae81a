"""Small FP8 checkpoints in the real on-disk formats, made from a stock transformers model.

Tests and demos need FP8 checkpoints without a hub: take a (random, tiny) stock model, quantize the tensors
real checkpoints ship as FP8, and write them with the key layout, scale names and sharding of the format
under test. Only safetensors and JSON are written, as real checkpoints are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from automodel_plugins.fp8.encode import quantize

DEFAULT_MODULES_TO_NOT_CONVERT = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.visual",
    "lm_head",
)
"""What real FP8 VLM checkpoints keep in BF16: the vision side and the output head."""


def linear_weights(model: nn.Module, modules_to_not_convert: Sequence[str]) -> set[str]:
    """Names of the ``nn.Linear`` weights outside ``modules_to_not_convert``: what FP8 checkpoints quantize."""
    skip = tuple(modules_to_not_convert)
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == m or name.startswith(m + ".") for m in skip)
    }


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without tied duplicates (a tied ``lm_head`` is absent, as ``save_pretrained`` writes)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach()
    return out


def write_fp8_checkpoint(
    model: nn.Module,
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] | None = None,
    scale_name: str = "weight_scale_inv",
    activation_scale_name: str | None = "activation_scale",
    scale_dtype: torch.dtype = torch.float32,
    rename: Callable[[str], str] | None = None,
    modules_to_not_convert: Sequence[str] = DEFAULT_MODULES_TO_NOT_CONVERT,
    quantized: Callable[[str], bool] | None = None,
    shards: int = 1,
    quantization_extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an FP8 checkpoint into ``directory`` (``config.json`` + safetensors) and return it.

    ``block_size`` None gives per-tensor 0-d scales (Mistral's format), else a scale grid per weight (partial
    edge blocks included). ``scale_name`` is the weight-scale suffix (``weight_scale_inv``, ``weight_scale``
    or ``qscale_weight``); ``activation_scale_name`` the static input scale written beside it (None: none).
    ``rename`` maps runtime names to the on-disk layout. ``shards`` > 1 writes an index.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rename = rename or (lambda name: name)
    to_quantize = quantized or linear_weights(model, modules_to_not_convert).__contains__
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in unique_state_dict(model).items():
        key = rename(name)
        if to_quantize(name):
            weight, scale = quantize(tensor.float(), block_size=block_size, scale_dtype=scale_dtype)
            module_key = key[: -len("weight")]
            tensors[key] = weight
            tensors[module_key + scale_name] = scale
            if activation_scale_name:
                tensors[module_key + activation_scale_name] = torch.tensor(1.0, dtype=scale_dtype)
        else:
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    _write_shards({k: v.contiguous() for k, v in tensors.items()}, directory, shards)
    _write_config(model, directory, dtype, block_size, modules_to_not_convert, quantization_extra)
    return directory


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    keys = list(tensors)
    weight_map = {}
    for index in range(shards):
        part = keys[index::shards]
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _write_config(
    model: nn.Module,
    directory: Path,
    dtype: torch.dtype,
    block_size: tuple[int, int] | None,
    modules_to_not_convert: Sequence[str],
    extra: dict[str, Any] | None,
) -> None:
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": list(block_size) if block_size else None,
        "dequantize": False,
        "modules_to_not_convert": list(modules_to_not_convert),
        **(extra or {}),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
