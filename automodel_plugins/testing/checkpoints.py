"""Small FP8 checkpoints in the real on-disk formats, made from a stock transformers model.

Tests and demos need FP8 checkpoints without a hub: take a (random, tiny) stock model, quantize the tensors
real checkpoints ship as FP8, and write them with the key layout, scale names and sharding of the format
under test. Only safetensors and JSON are written, as real checkpoints are.

Mixture-of-experts layers in transformers 5's fused layout (``mlp.experts.gate_up_proj [E, 2I, H]``, gate rows
first, and ``mlp.experts.down_proj [E, H, I]``) can be written in any of their on-disk forms (:data:`EXPERT_FORMS`):
one 2-D tensor per expert and projection (the FP8 releases), fused and transposed (the BF16 releases), or fused
as the module holds them; FP8 experts get one scale per piece, or one grid per expert when fused.
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

EXPERT_FORMS = ("per-expert", "fused-transposed", "fused-runtime")
"""How :func:`write_fp8_checkpoint` writes fused MoE experts: per expert and projection
(``mlp.experts.{e}.{gate,up,down}_proj.weight``), fused ``[E, H, 2I]`` / ``[E, I, H]``, or fused as held."""
_EXPERT_PARAMETERS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")

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
    experts: str | None = None,
    fp8_experts: bool = True,
) -> Path:
    """Write ``model`` as an FP8 checkpoint into ``directory`` (``config.json`` + safetensors) and return it.

    ``block_size`` None gives per-tensor 0-d scales (Mistral's format), else a scale grid per weight (partial
    edge blocks included). ``scale_name`` is the weight-scale suffix (``weight_scale_inv``, ``weight_scale``
    or ``qscale_weight``); ``activation_scale_name`` the static input scale written beside it (None: none).
    ``rename`` maps runtime names to the on-disk layout. ``shards`` > 1 writes an index. ``experts`` (one of
    :data:`EXPERT_FORMS`) writes fused MoE expert parameters in that form, FP8 unless ``fp8_experts`` is off
    (a fused FP8 tensor's scale is ``<name>_scale_inv``, one grid per expert, as transformers names it).
    """
    if experts is not None and experts not in EXPERT_FORMS:
        raise ValueError(f"experts must be one of {EXPERT_FORMS}, got {experts!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rename = rename or (lambda name: name)
    to_quantize = quantized or linear_weights(model, modules_to_not_convert).__contains__
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in unique_state_dict(model).items():
        key = rename(name)
        if experts is not None and name.endswith(_EXPERT_PARAMETERS):
            fp8 = {"block_size": block_size, "scale_dtype": scale_dtype} if fp8_experts else None
            tensors.update(_expert_tensors(key, tensor, experts, fp8, dtype, scale_name))
        elif to_quantize(name):
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


def _expert_tensors(
    key: str,
    fused: torch.Tensor,
    form: str,
    fp8: dict[str, Any] | None,
    dtype: torch.dtype,
    scale_name: str,
) -> dict[str, torch.Tensor]:
    """One fused expert parameter (``[E, 2I, H]`` gate_up or ``[E, H, I]`` down) in ``form``: each stored matrix
    quantized with its own scale when ``fp8`` holds the quantization options."""
    if form == "per-expert":
        layer, parameter = key.rsplit(".experts.", 1)
        projections = ("gate_proj", "up_proj") if parameter == "gate_up_proj" else ("down_proj",)
        out = {}
        for expert in range(fused.shape[0]):
            for projection, value in zip(projections, fused[expert].chunk(len(projections)), strict=True):
                weight_key = f"{layer}.experts.{expert}.{projection}.weight"
                if fp8 is None:
                    out[weight_key] = value.to(dtype)
                else:
                    out[weight_key], out[weight_key.removesuffix("weight") + scale_name] = quantize(
                        value.float(), **fp8
                    )
        return out
    stored = fused.transpose(1, 2) if form == "fused-transposed" else fused
    if fp8 is None:
        return {key: stored.to(dtype)}
    if fp8["block_size"] is None:
        weight, scale = quantize(stored.float(), **fp8)
    else:
        parts = [quantize(matrix.float(), **fp8) for matrix in stored]
        weight, scale = torch.stack([w for w, _ in parts]), torch.stack([s for _, s in parts])
    return {key: weight, f"{key}_{scale_name.removeprefix('weight_')}": scale}


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
