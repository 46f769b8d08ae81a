"""After a load the model declares no quantization, so ``save_pretrained`` writes a plain checkpoint that
stock transformers (and this host) load back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mistral3_checkpoints import (
    PLUGIN,
    Checkpoints,
    CheckpointSpec,
    ModelSpec,
    assert_same_weights,
    checkpoint_tensors,
    logits,
    stock_load,
)

from automodel_plugins import from_pretrained
from automodel_plugins.registry import Registry


def test_config_has_no_quantization_after_load(registry: Registry, checkpoints: Checkpoints) -> None:
    path = checkpoints(block_size=(32, 32))
    assert "quantization_config" in json.loads((path / "config.json").read_text())
    model = from_pretrained(path, registry=registry)
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert "quantization_config" not in json.loads(model.config.to_json_string())
    assert model.automodel_composition.dequantized_from == "fp8"


@pytest.mark.parametrize(
    "spec",
    [
        CheckpointSpec(),
        CheckpointSpec(model=ModelSpec(tie=True), layout="runtime", block_size=(16, 16), shards=2),
    ],
    ids=["per-tensor-untied", "block-tied-runtime"],
)
def test_save_pretrained_then_stock_load_is_identical(
    registry: Registry, checkpoints: Checkpoints, spec: CheckpointSpec, tmp_path: Path
) -> None:
    model = from_pretrained(checkpoints(spec), registry=registry)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert saved_config["tie_word_embeddings"] is spec.model.tie
    saved = checkpoint_tensors(tmp_path)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert not any("scale" in key for key in saved)
    stock = stock_load(tmp_path)
    assert_same_weights(stock, model)
    assert torch.equal(logits(stock), logits(model))


def test_saved_checkpoint_loads_back_through_the_plugin(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    model = from_pretrained(checkpoints(), registry=registry)
    model.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path, registry=registry)
    assert again.automodel_composition.plugin == PLUGIN
    assert again.automodel_composition.load.dequantized == 0
    assert_same_weights(again, model)


def test_trained_weights_survive_the_round_trip(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    """Memory-mapped BF16 tensors are private copies on write: training them touches neither the source
    checkpoint nor the saved one."""
    path = checkpoints(quantized=False)
    source_bytes = (path / "model.safetensors").read_bytes()
    model = from_pretrained(path, registry=registry)
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    assert (path / "model.safetensors").read_bytes() == source_bytes
    assert_same_weights(stock_load(tmp_path), model)
