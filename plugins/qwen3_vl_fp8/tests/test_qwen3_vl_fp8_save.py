"""A plugin with no adapter of its own saves through the host's default one: Qwen3-VL block FP8 (runtime key
layout, dynamic activations) round-trips byte for byte, and ``"none"`` is what stock ``save_pretrained`` writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import automodel_plugins

PLUGIN = "qwen3_vl_fp8"


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32-scales", "bf16-scales"])
def test_block_fp8_round_trips_and_bf16_matches_stock(
    qwen_model: Any,
    fp8_checkpoint_factory: Any,
    plugin_registry: Any,
    tmp_path: Path,
    scale_dtype: torch.dtype,
) -> None:
    registry = plugin_registry(PLUGIN)
    source = fp8_checkpoint_factory(
        qwen_model,
        name="qwen-save",
        block_size=(32, 32),
        scale_dtype=scale_dtype,
        activation_scale_name=None,
        modules_to_not_convert=("model.visual", "lm_head"),
        quantization_extra={"activation_scheme": "dynamic"},
    )
    model = automodel_plugins.from_pretrained(source, registry=registry)
    report = automodel_plugins.save_pretrained(model, tmp_path / "fp8")
    assert report.quantized == 14 and report.scales_kept == 14 and report.carried == 0
    saved, original = tensors_of(tmp_path / "fp8"), tensors_of(source)
    assert sorted(saved) == sorted(original)
    assert all(
        saved[k].dtype == original[k].dtype and torch.equal(byte_view(saved[k]), byte_view(original[k]))
        for k in original
    )
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((source / "config.json").read_text())["quantization_config"]
    )

    automodel_plugins.save_pretrained(model, tmp_path / "ours", quantization="none")
    model.save_pretrained(tmp_path / "stock")
    for file in (tmp_path / "stock").glob("*.safetensors"):
        assert (tmp_path / "ours" / file.name).read_bytes() == file.read_bytes()
