"""An optimizer step on an FP8-resident model (``dequantize=False``) whose FP8 layers all stay frozen without an
adapter trains only embeddings, norms and the head: it warns, once (``FrozenFp8BaseWarning``); with PEFT LoRA
on the FP8 layers, or on a dequantized model, it stays silent."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.errors import FrozenFp8BaseWarning
from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def checkpoint(fp8_checkpoint_factory: Any) -> Path:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config())
    return fp8_checkpoint_factory(model, name="mistral3-resident-warning", block_size=(32, 32))


def load(checkpoint: Path, plugin_registry: Any, *, dequantize: bool = False) -> torch.nn.Module:
    return automodel_plugins.from_pretrained(
        checkpoint, dtype=torch.float32, dequantize=dequantize, registry=plugin_registry("mistral3_fp8")
    )


def steps(model: torch.nn.Module, count: int = 2) -> list[warnings.WarningMessage]:
    """``count`` AdamW steps on the model's trainable parameters; the FrozenFp8BaseWarnings they raised."""
    batch = mistral3_image_batch(tiny_mistral3_config(), batch=1, seq=12)  # one image: the projector runs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return [w for w in caught if issubclass(w.category, FrozenFp8BaseWarning)]


def test_a_step_with_every_fp8_layer_frozen_and_no_adapter_warns_once(
    checkpoint: Path, plugin_registry: Any
) -> None:
    model = load(checkpoint, plugin_registry)
    caught = steps(model)
    assert len(caught) == 1  # the first step decides, once
    message = str(caught[0].message)
    assert "14 FP8 layers are all frozen with no adapter" in message and "dequantize=True" in message
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,} parameters" in message
    assert caught[0].filename == __file__  # points at the caller's optimizer.step()


def test_a_step_with_lora_on_the_fp8_layers_is_silent(checkpoint: Path, plugin_registry: Any) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert steps(peft.get_peft_model(load(checkpoint, plugin_registry), config)) == []


def test_lora_only_beside_the_fp8_layers_still_warns(checkpoint: Path, plugin_registry: Any) -> None:
    """LoRA on the (BF16) projector alone leaves every FP8 layer of the text stack untrained."""
    config = peft.LoraConfig(r=4, target_modules=["linear_1"], init_lora_weights=False)
    assert len(steps(peft.get_peft_model(load(checkpoint, plugin_registry), config))) == 1


def test_a_dequantized_model_and_an_unrelated_optimizer_are_silent(
    checkpoint: Path, plugin_registry: Any
) -> None:
    assert steps(load(checkpoint, plugin_registry, dequantize=True)) == []
    resident = load(checkpoint, plugin_registry)
    other = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenFp8BaseWarning)
        optimizer.step()  # holds none of the resident model's parameters: not its step
    assert len(steps(resident)) == 1  # still watched: its own first step warns
