"""``inspect --json``'s figures, checked against what they are computed from, found independently.

The checkpoint side comes from the ``safetensors`` library's own header reader (not the host's parser), the model
side from the stock transformers class built on meta; every count and byte figure of ``checkpoint`` and ``load``
is recomputed from those two alone. One header-only Qwen3-VL-MoE in the FP8 releases' form (sharded, block FP8
experts stored per expert and projection, dynamic activations) and one Mistral3 with real data (per-tensor FP8,
static activation scales), so that the fast paths of header parsing and planning (entries checked in bulk,
shared piece geometries and scale verdicts) are held to the same answers as the plain ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_plugins import installed
from safetensors import safe_open
from torch import nn

from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.header_only import write_header_only_checkpoint
from automodel_plugins.testing.pytest_plugin import subprocess_env
from automodel_plugins.testing.tiny_models import tiny_mistral3_config, tiny_qwen3_vl_moe_config

SAFETENSORS_NAMES = {"F8_E4M3": "float8_e4m3fn", "F32": "float32", "BF16": "bfloat16"}
ITEMSIZE = {"float8_e4m3fn": 1, "float32": 4, "bfloat16": 2}
BLOCK = (16, 16)
EXPERT_PROJECTIONS = {"gate_up_proj": 2, "down_proj": 1}


def inspect_json(path: Path, plugin: str) -> dict[str, Any]:
    env = subprocess_env({"AUTOMODEL_PLUGINS": plugin, "AUTOMODEL_PLUGINS_PROGRESS": "0"})
    result = subprocess.run(
        [sys.executable, "-m", "automodel_plugins.cli", "inspect", str(path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype name, shape), read by the ``safetensors`` library from every shard."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as opened:
            for key in opened.keys():  # noqa: SIM118 (a safe_open handle is no mapping)
                view = opened.get_slice(key)
                out[key] = (SAFETENSORS_NAMES[view.get_dtype()], tuple(view.get_shape()))
    return out


def meta_model(config: Any) -> nn.Module:
    import transformers

    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.bfloat16)


def expected(path: Path, model: nn.Module, block: tuple[int, int] | None) -> dict[str, Any]:
    """Every figure of ``checkpoint`` and ``load``, from the safetensors headers and the stock meta model."""
    stored = headers(path)
    by_dtype: dict[str, int] = {}
    for dtype, _ in stored.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + 1
    tensors = dict(model.named_parameters())  # no persistent buffers, nothing tied in these two models
    experts = {n for n in tensors if n.rpartition(".")[2] in EXPERT_PROJECTIONS and ".mlp.experts." in n}
    fp8 = {n for n in tensors if stored.get(n, ("",))[0] == "float8_e4m3fn"} | experts
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear}

    def grid(shape: tuple[int, ...]) -> int:  # one fp32 scale per block of each matrix, or one per tensor
        if block is None:
            return 1
        *lead, rows, cols = shape
        return math.prod(lead) * -(-rows // block[0]) * -(-cols // block[1])

    kept = {n for n in fp8 if n in linears or n in experts}

    def activation_bytes(name: str) -> int:  # a resident layer keeps its static activation scale
        stored_scale = stored.get(name.removesuffix("weight") + "activation_scale")
        return 0 if stored_scale is None else ITEMSIZE[stored_scale[0]] * math.prod(stored_scale[1])

    numel = {n: t.numel() for n, t in tensors.items()}
    return {
        "checkpoint": {
            "files": sorted(file.name for file in path.glob("*.safetensors")),
            "index": (path / "model.safetensors.index.json").is_file(),
            "tensors": len(stored),
            "tensors_by_dtype": dict(sorted(by_dtype.items())),
            "fp8_tensors": by_dtype.get("float8_e4m3fn", 0),
            "tensor_bytes": sum(ITEMSIZE[d] * math.prod(s) for d, s in stored.values()),
            "file_bytes": sum(file.stat().st_size for file in path.glob("*.safetensors")),
        },
        "load": {
            "dtype": "bfloat16",
            "model_tensors": len(tensors),
            "fp8_tensors": len(fp8),
            "non_fp8_tensors": len(tensors) - len(fp8),
            "used_in_place": len(tensors) - len(fp8),
            "converted": 0,
            "assembled_tensors": len(experts),
            "pieces": sum(
                model.get_parameter(n).shape[0] * EXPERT_PROJECTIONS[n.rpartition(".")[2]] for n in experts
            ),
            "scale_keys": by_dtype.get("float8_e4m3fn", 0),  # every FP8 weight or piece read with its scale
            "dropped_keys": sum(key.endswith(".activation_scale") for key in stored),
            "bytes_after_load": 2 * sum(numel.values()),
            "fp8_resident_layers": len(kept),
            "bytes_after_load_fp8_resident": sum(
                numel[n] + 4 * grid(tuple(tensors[n].shape)) + activation_bytes(n)
                if n in kept
                else 2 * numel[n]
                for n in tensors
            ),
            "fp8_not_resident": len(fp8 - kept),
        },
    }


def check(document: dict[str, Any], want: dict[str, Any]) -> None:
    assert document["bytes_read"] == 0
    assert document["checkpoint"] == want["checkpoint"]
    assert {k: document["load"][k] for k in want["load"]} == want["load"]


@pytest.mark.skipif(
    not installed("automodel-plugins-qwen3-vl-moe-fp8"), reason="qwen3_vl_moe_fp8 plugin not installed"
)
def test_header_only_moe_in_the_releases_form(tmp_path: Path) -> None:
    config = tiny_qwen3_vl_moe_config(num_experts=8, moe_intermediate_size=32)
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    layers = config.text_config.num_hidden_layers
    write_header_only_checkpoint(
        config,
        tmp_path,
        block_size=BLOCK,
        modules_to_not_convert=(
            "model.visual",
            "lm_head",
            *(f"model.language_model.layers.{i}.mlp.gate" for i in range(layers)),
        ),
        activation_scale=False,
        quantization_extra={"fmt": "e4m3"},
        shards=3,
    )
    document = inspect_json(tmp_path, "qwen3_vl_moe_fp8")
    assert document["plugin"] == "qwen3_vl_moe_fp8"
    assert document["load"]["adapter_details"]["experts"] == "per-expert"
    want = expected(tmp_path, meta_model(config), BLOCK)
    assert want["load"]["assembled_tensors"] == 2 * layers and want["load"]["pieces"] == 3 * 8 * layers
    check(document, want)


@pytest.mark.skipif(
    not installed("automodel-plugins-mistral3-fp8"), reason="mistral3_fp8 plugin not installed"
)
def test_mistral3_with_per_tensor_scales_and_activation_scales(tmp_path: Path) -> None:
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config())
    model.config.architectures = ["Mistral3ForConditionalGeneration"]
    write_fp8_checkpoint(
        model,
        tmp_path,
        modules_to_not_convert=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        shards=2,
    )
    document = inspect_json(tmp_path, "mistral3_fp8")
    assert document["plugin"] == "mistral3_fp8"
    want = expected(tmp_path, meta_model(model.config), None)
    assert want["load"]["dropped_keys"] == want["load"]["fp8_tensors"] > 0
    check(document, want)
