"""``describe_checkpoint``: what a load would do, from headers alone; every number recomputed here from the
generated checkpoint with safetensors itself, and no tensor data read by the host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import ODD, PLUGIN, Checkpoints, CheckpointSpec, ModelSpec, edit_tensors
from safetensors import safe_open

from automodel_plugins.errors import UnexpectedKeysError
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.registry import Registry

pytestmark = pytest.mark.usefixtures("no_tensor_reads")


def headers(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Key -> (dtype, shape) of every tensor, through safetensors' lazy slices (no data read)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                view = handle.get_slice(key)
                out[key] = (_DTYPES[view.get_dtype()], tuple(view.get_shape()))
    return out


_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}


def expected_numbers(checkpoints: Checkpoints, spec: CheckpointSpec, dtype: torch.dtype) -> dict[str, Any]:
    path = checkpoints(spec)
    stored = headers(path)
    fp8 = [k for k, (d, _) in stored.items() if d == torch.float8_e4m3fn]
    scales = [k for k in stored if k.endswith("." + spec.scale_name)]
    activations = [
        k for k in stored if spec.activation_scale_name and k.endswith("." + spec.activation_scale_name)
    ]
    data = [k for k in stored if k not in scales and k not in activations]
    model = checkpoints.model(spec.model)
    unique = {id(p): p for p in model.parameters()}.values()
    return {
        "tensors": len(stored),
        "fp8": len(fp8),
        "scales": len(scales),
        "dropped": len(activations),
        "model_tensors": len(data),
        "in_place": sum(stored[k][0] == dtype for k in data),
        "tensor_bytes": sum(torch.Size(s).numel() * d.itemsize for d, s in stored.values()),
        "file_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
        "bytes_after_load": sum(p.numel() for p in unique) * dtype.itemsize,
        "files": sorted(f.name for f in path.glob("*.safetensors")),
    }


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["default-bf16", "fp32"])
@pytest.mark.parametrize(
    "spec",
    [
        CheckpointSpec(shards=2),
        CheckpointSpec(model=ODD, layout="runtime", block_size=(32, 32), scale_name="weight_scale"),
        CheckpointSpec(
            model=ModelSpec(tie=True), scale_name="qscale_weight", activation_scale_name="qscale_act"
        ),
        CheckpointSpec(quantized=False),
    ],
    ids=["per-tensor-sharded", "block-runtime", "tied-qscale", "bf16"],
)
def test_numbers_match_the_checkpoint(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, dtype: torch.dtype | None
) -> None:
    path = checkpoints(spec)
    target = dtype or torch.bfloat16
    expected = expected_numbers(checkpoints, spec, target)
    described = describe_checkpoint(path, dtype=dtype, registry=registry)
    assert described["bytes_read"] == 0
    files = described["checkpoint"]
    assert files["tensors"] == expected["tensors"] and files["fp8_tensors"] == expected["fp8"]
    assert files["tensor_bytes"] == expected["tensor_bytes"] and files["file_bytes"] == expected["file_bytes"]
    assert sorted(files["files"]) == expected["files"] and files["index"] is (spec.shards > 1)
    load = described["load"]
    assert load["layout"] == spec.layout and load["dtype"] == str(target).removeprefix("torch.")
    assert load["model_tensors"] == expected["model_tensors"]
    assert load["fp8_tensors"] == expected["fp8"] == expected["scales"] == load["scale_keys"]
    assert load["non_fp8_tensors"] == expected["model_tensors"] - expected["fp8"]
    assert load["used_in_place"] == expected["in_place"]
    assert load["converted"] == load["non_fp8_tensors"] - expected["in_place"]
    assert load["dropped_keys"] == expected["dropped"]
    assert load["bytes_after_load"] == expected["bytes_after_load"]
    if spec.quantized:
        block = spec.block_size
        assert load["granularity"] == (f"block {block[0]}x{block[1]}" if block else "per-tensor")
        assert load["scale_names"] == [spec.scale_name]
    else:
        assert load["granularity"] is None and load["scale_names"] == [] and expected["fp8"] == 0


def test_config_summary_and_claim(registry: Registry, checkpoints: Checkpoints) -> None:
    spec = CheckpointSpec(model=ODD, block_size=(16, 16))
    path = checkpoints(spec)
    raw = json.loads((path / "config.json").read_text())
    described = describe_checkpoint(path, registry=registry)
    config = described["config"]
    assert config["model_type"] == "mistral3" and config["text_model_type"] == "ministral3"
    assert config["num_hidden_layers"] == raw["text_config"]["num_hidden_layers"] == 2
    assert config["hidden_size"] == 72 and config["vocab_size"] == raw["text_config"]["vocab_size"]
    assert config["tie_word_embeddings"] is False
    assert config["quantization"] == {
        "quant_method": "fp8",
        "weight_block_size": [16, 16],
        "activation_scheme": "static",
        "modules_to_not_convert": list(spec.modules_to_not_convert),
    }
    assert described["plugin"] == PLUGIN
    (claim,) = described["claims"]
    assert claim["plugin"] == PLUGIN and claim["claimed"] and "16x16 block" in claim["reason"]
    assert json.loads(json.dumps(described)) == described  # plain JSON


def test_agrees_with_a_real_load(
    registry: Registry, checkpoints: Checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan's counts are what ``from_pretrained`` then reports doing."""
    path = checkpoints(shards=2)
    described = describe_checkpoint(path, registry=registry)["load"]
    monkeypatch.undo()  # let the real load read tensors
    from automodel_plugins import from_pretrained

    model = from_pretrained(path, registry=registry)
    report = model.automodel_composition.load
    assert (report.tensors, report.dequantized, report.used_in_place, report.converted) == (
        described["model_tensors"],
        described["fp8_tensors"],
        described["used_in_place"],
        described["converted"],
    )
    assert len(report.dropped_keys) == described["dropped_keys"]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == described["bytes_after_load"]


def test_unclaimed_checkpoint_is_described_without_a_plan(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    described = describe_checkpoint(checkpoints(model=ModelSpec(text_type="mistral")), registry=registry)
    assert described["plugin"] is None and described["load"] is None
    assert described["config"]["text_model_type"] == "mistral"
    assert described["claims"] == [
        {
            "plugin": PLUGIN,
            "claimed": False,
            "reason": "mistral3 VLM with text model 'mistral': only 'ministral3' or 'mistral4' is served",
            "priority": None,
            "error": None,
        }
    ]
    assert described["checkpoint"]["fp8_tensors"] == 14


def test_a_load_that_would_fail_fails_the_same_way(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    path = checkpoints.copy(tmp_path / "extra")
    edit_tensors(path, lambda t: t.__setitem__("vision_tower.surplus", torch.zeros(1)))
    with pytest.raises(UnexpectedKeysError, match=r"vision_tower\.surplus"):
        describe_checkpoint(path, registry=registry)
