"""An FP8-resident tiny Qwen3-VL-MoE (``dequantize=False``, experts ``Fp8Experts``) with each
``experts_implementation`` against the same checkpoint loaded dequantized (``dequantize=True``: the stock class
with stock experts, the plugin's loss) with the same implementation: logits, loss and the gradients of LoRA on the
attention; and its logits against the stock class holding the hand-dequantized weights
(``moe_checkpoints.reference_model``), with the same implementation. ``eager`` and ``grouped_mm`` are equal bit for bit (the same loop; the same grouped kernel over the
same values and rows), ``batched_mm`` within rounding (stock's runs matrix-vector products, ours the grouped
kernel: see ``tests/test_fp8_experts_grouped.py``)."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from moe_checkpoints import GRID_THW, LAYERS, PLUGIN, reference_model, tiny_config

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.testing.residency import watch_weight_copies
from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch

ALIGNED = (8, 8)
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def lora_step(
    model: Any, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(model, config)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_the_default_is_stocks_default_for_the_model(moe_checkpoint: Any) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    resident = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    stock_default = reference_model(path, F32).config.get_text_config()._experts_implementation
    experts = [m for m in resident.modules() if isinstance(m, Fp8Experts)]
    assert len(experts) == LAYERS and stock_default == "grouped_mm"
    assert {m.experts_implementation for m in experts} == {stock_default}
    resident.set_experts_implementation("eager")
    assert {m.experts_implementation for m in experts} == {"eager"}


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_logits_loss_and_lora_gradients_equal_stock_with_the_same_implementation(
    implementation: str, dtype: torch.dtype, moe_checkpoint: Any, image_batch: Any
) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    resident = automodel_plugins.from_pretrained(path, dtype=dtype, dequantize=False)
    dequantized = automodel_plugins.from_pretrained(path, dtype=dtype)
    stock = reference_model(path, dtype)
    for model in (resident, dequantized, stock):
        model.set_experts_implementation(implementation)
    assert {m.experts_implementation for m in resident.modules() if isinstance(m, Fp8Experts)} == {
        implementation
    }
    assert not any(isinstance(m, Fp8Experts) for m in dequantized.modules())
    if implementation == "batched_mm":
        tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == F32 else {"atol": 2e-2, "rtol": 2e-2}
    else:
        tol = {"atol": 0, "rtol": 0}
    inputs = {k: v for k, v in image_batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(resident(**inputs).logits, stock(**inputs).logits, **tol)
    (logits, loss, grads), (want_logits, want_loss, want_grads) = (
        lora_step(resident, image_batch),
        lora_step(dequantized, image_batch),
    )
    assert sorted(grads) == sorted(want_grads) and len(grads) == LAYERS * 4 * 2
    torch.testing.assert_close(logits, want_logits, **tol)
    torch.testing.assert_close(loss, want_loss, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_no_dequantized_expert_stays_alive_or_is_saved_for_backward(moe_checkpoint: Any) -> None:
    """The grouped path over a whole model: 11 tokens, top-2, so no activation ([11 | 22, *]) shares an expert
    matrix's shape (24, 48, 64) and the watch counts only dequantized copies."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert {m.experts_implementation for m in experts} == {"grouped_mm"}
    batch = qwen3_vl_image_batch(tiny_config(), batch=1, seq=11, grid_thw=GRID_THW)
    with watch_weight_copies(model, experts) as watch:
        model(**batch).loss.backward()
    assert watch.created > 0 and watch.layer_calls == LAYERS
    assert watch.alive_after_layers == [0] * LAYERS and watch.saved_copies == []
    assert all(m.gate_up_proj.grad is None for m in experts)
