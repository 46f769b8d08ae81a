"""PEFT LoRA on an FP8 Mistral3 loaded through the plugin: the returned stock class takes adapters as usual.

The reference is the same loaded weights with the stock forward (the class method, the override removed) under
the same LoRA: the fused loss must give its loss and its LoRA gradients, an adapter on ``lm_head`` must fall
back to the stock loss (the fused loss reads ``lm_head.weight`` and would skip the adapter), and an adapter
saved and loaded again, or merged, must give the same loss.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import Checkpoints, CheckpointSpec, tiny_config
from transformers import Mistral3ForConditionalGeneration

from automodel_plugins import from_pretrained
from automodel_plugins.registry import Registry
from automodel_plugins.testing.tiny_models import mistral3_image_batch

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "linear_1"]  # text attention and the vision projector


def batch() -> dict[str, Any]:
    """Two sequences with one image; the second's prompt ignored in the labels."""
    batch = mistral3_image_batch(tiny_config(), seq=16, image_rows=1, dtype=torch.float32)
    batch["labels"][1, :3] = -100
    return batch


def with_lora(model: Mistral3ForConditionalGeneration, targets: list[str]) -> Any:
    """A LoRA with random (not zero) ``B``, the same for the same targets, so the adapter changes the loss."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def with_stock_forward(model: Mistral3ForConditionalGeneration) -> Mistral3ForConditionalGeneration:
    stock = copy.deepcopy(model)
    del stock.forward  # the instance override; the class's own forward is what remains
    return stock


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
    assert grads and all(g is not None and g.any() for g in grads.values())
    return grads


@pytest.fixture(scope="module")
def checkpoint(checkpoints: Checkpoints) -> Path:
    return checkpoints(CheckpointSpec(block_size=(32, 32)))


@pytest.fixture
def loaded(checkpoint: Path, registry: Registry) -> Mistral3ForConditionalGeneration:
    model = from_pretrained(checkpoint, dtype=torch.float32, skip_logits=True, registry=registry)
    assert "forward" in vars(model)  # the plugin's override is bound on the instance
    return model


def test_lora_loss_and_adapter_gradients_equal_stock(loaded: Any) -> None:
    stock = with_lora(with_stock_forward(loaded), TARGETS)
    fused = with_lora(loaded, TARGETS)
    assert type(fused.get_base_model()) is Mistral3ForConditionalGeneration
    expected, got = stock(**batch()), fused(**batch())
    assert got.logits is None and expected.logits is not None  # skip_logits reaches through PEFT
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    expected_grads, got_grads = lora_grads(stock), lora_grads(fused)
    assert got_grads.keys() == expected_grads.keys()
    assert any("linear_1" in name for name in got_grads)  # the image reaches the loss through the projector
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=ATOL, rtol=0, msg=name)
    assert all(p.grad is None for n, p in fused.named_parameters() if "lora_" not in n)  # base frozen


def test_lora_on_lm_head_falls_back_to_the_stock_loss(loaded: Any) -> None:
    targets = [*TARGETS, "lm_head"]
    stock = with_lora(with_stock_forward(loaded), targets)
    fused = with_lora(loaded, targets)
    with pytest.warns(UserWarning, match="lm_head is a peft"):
        got = fused(**batch())
    expected = stock(**batch())
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    expected_grads, got_grads = lora_grads(stock), lora_grads(fused)
    assert any("lm_head" in name for name in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_saved_adapter_reloads_and_merges_to_the_same_loss(
    loaded: Any, checkpoint: Path, registry: Registry, tmp_path: Path
) -> None:
    trained = with_lora(loaded, TARGETS)
    with torch.no_grad():
        expected = trained(**batch()).loss
    trained.save_pretrained(tmp_path / "adapter")

    fresh = from_pretrained(checkpoint, dtype=torch.float32, skip_logits=True, registry=registry)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    assert type(merged) is Mistral3ForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch()).loss, expected, atol=ATOL, rtol=0)
        out = merged(**batch())
    assert out.logits is None  # still the plugin's forward after merging
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
