"""Full-size FP8 checkpoints with headers and no data: ``config.json`` and safetensors files whose data is a
hole (sparse files: one, or shards and their index). Every header entry is what :func:`~automodel_plugins.testing.checkpoints.write_fp8_checkpoint`
would write for the model (FP8 linears with their scales, fused MoE experts per expert, the rest BF16), so
``inspect`` and :func:`~automodel_plugins.plan_memory` can answer for a 100B+ model without its bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec
from automodel_plugins.fp8.scales import grid_shape
from automodel_plugins.model.stock import build_on_meta
from automodel_plugins.testing.checkpoints import linear_weights, unique_state_dict

__all__ = ["write_header_only_checkpoint"]

_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _fp8(
    name: str, shape: tuple[int, ...], block: tuple[int, int] | None, activation: bool
) -> list[TensorSpec]:
    module = name.removesuffix("weight")
    specs = [TensorSpec(name, torch.float8_e4m3fn, shape)]
    specs.append(
        TensorSpec(
            module + "weight_scale_inv", torch.float32, () if block is None else grid_shape(shape, block)
        )
    )
    if activation:
        specs.append(TensorSpec(module + "activation_scale", torch.float32, ()))
    return specs


def write_header_only_checkpoint(
    config: Any,
    directory: str | Path,
    *,
    block_size: tuple[int, int] | None,
    modules_to_not_convert: Sequence[str],
    activation_scale: bool = True,
    quantization_extra: dict[str, Any] | None = None,
    shards: int = 1,
) -> int:
    """Write ``config`` (a transformers config) as a header-only FP8 checkpoint into ``directory``; fused experts
    are written per expert and projection, as the FP8 releases store them. ``shards`` > 1 deals the tensors
    out round-robin to ``model-0000i-of-0000n.safetensors`` files and writes their index. Returns the tensor
    bytes declared."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_on_meta(config, torch.bfloat16)
    quantized = linear_weights(model, modules_to_not_convert)
    specs: list[TensorSpec] = []
    for name, tensor in unique_state_dict(model).items():
        shape = tuple(tensor.shape)
        if name.endswith(_EXPERTS):
            layer, parameter = name.rsplit(".experts.", 1)
            projections = ("gate_proj", "up_proj") if parameter == "gate_up_proj" else ("down_proj",)
            rows = shape[1] // len(projections)
            for expert in range(shape[0]):
                for projection in projections:
                    key = f"{layer}.experts.{expert}.{projection}.weight"
                    specs += _fp8(key, (rows, shape[2]), block_size, activation_scale)
        elif name in quantized:
            specs += _fp8(name, shape, block_size, activation_scale)
        else:
            specs.append(TensorSpec(name, torch.bfloat16, shape))
    _write_files(directory, specs, shards)
    described = config.to_dict()
    described["dtype"] = "bfloat16"
    described["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "static" if activation_scale else "dynamic",
        "weight_block_size": list(block_size) if block_size else None,
        "modules_to_not_convert": list(modules_to_not_convert),
        **(quantization_extra or {}),
    }
    (directory / "config.json").write_text(json.dumps(described, indent=2, sort_keys=True))
    return sum(spec.nbytes for spec in specs)


def _write_files(directory: Path, specs: list[TensorSpec], shards: int) -> None:
    """``model.safetensors``, or ``shards`` files (tensor ``i`` in file ``i % shards``) and their index."""
    if shards == 1:
        _write_file(directory / "model.safetensors", specs)
        return
    weight_map: dict[str, str] = {}
    for index in range(shards):
        part = specs[index::shards]
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        _write_file(directory / filename, part)
        weight_map.update(dict.fromkeys((spec.name for spec in part), filename))
    index_json = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _write_file(path: Path, specs: list[TensorSpec]) -> None:
    SafetensorsWriter.create(path, FileLayout.plan(specs, {"format": "pt"})).close(sync=False)
