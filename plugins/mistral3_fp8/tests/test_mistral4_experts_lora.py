"""PEFT LoRA on Mistral 4's FP8-resident fused experts (``target_parameters``): Small 4's form, one scale per expert
``[E, 1, 1]`` (held as one whole-matrix block per expert), and fine-grained 16x16 blocks. Against the same
checkpoint loaded dequantized with stock PEFT: loss and every LoRA gradient bit for bit; merging re-quantizes
only the experts whose values moved, within one FP8 step of stock PEFT's merge, with a fresh scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from mistral4_checkpoints import EXPERTS, LAYERS, PLUGIN, tiny_model, write_checkpoint

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.testing.tiny_models import text_batch

F32 = torch.float32
FORMS = ("per-tensor", "block-fused")
MOE_LAYERS = range(1, LAYERS)  # layer 0 is dense
E4M3_MAX = 448.0


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, root = tiny_model(), tmp_path_factory.mktemp("mistral4-lora")
    return {form: write_checkpoint(model, root / form, form) for form in FORMS}


def adapted(model: Any, adapters: dict[str, torch.Tensor] | None = None) -> Any:
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    model = peft.get_peft_model(model, config)
    if adapters is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(adapters[name])
    return model


def experts_of(model: Any, layer: int) -> Any:
    return model.get_submodule(f"model.language_model.layers.{layer}.mlp.experts")


@pytest.mark.parametrize("form", FORMS)
def test_loss_and_lora_gradients_equal_lora_on_the_dequantized_model(
    checkpoints: dict[str, Path], form: str
) -> None:
    want = adapted(automodel_plugins.from_pretrained(checkpoints[form], dtype=F32))
    adapters = {n: p.detach().clone() for n, p in want.named_parameters() if "lora_" in n}
    got = adapted(automodel_plugins.from_pretrained(checkpoints[form], dtype=F32, dequantize=False), adapters)
    assert all(
        isinstance(experts_of(got.base_model.model, layer).get_base_layer(), Fp8Experts)
        for layer in MOE_LAYERS
    )
    batch = text_batch(want.config, batch=2, seq=12)
    losses, grads = [], []
    for model in (got, want):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert sorted(grads[0]) == sorted(grads[1])
    assert sum(".experts." in n for n in grads[0]) == len(MOE_LAYERS) * 2 * 2
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


@pytest.mark.parametrize("form", FORMS)
def test_merge_re_quantizes_the_moved_experts_with_a_fresh_scale(
    checkpoints: dict[str, Path], form: str
) -> None:
    path = checkpoints[form]
    first = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False))
    adapters = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}
    untouched = 3  # expert 3 of layer 1's down_proj: lora_B's columns zero (an expert no token reached)
    name = next(n for n in adapters if "layers.1.mlp.experts.lora_B" in n)  # the outer wrapper: down_proj
    adapters[name].view(adapters[name].shape[0], -1, EXPERTS)[:, :, untouched] = 0
    model = adapted(automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False), adapters)
    before = {
        layer: {
            k: v.clone()
            for k, v in experts_of(model.base_model.model, layer).get_base_layer().state_dict().items()
        }
        for layer in MOE_LAYERS
    }
    merged = automodel_plugins.merge_lora(model)
    stock = adapted(automodel_plugins.from_pretrained(path, dtype=F32), adapters).merge_and_unload()
    for layer in MOE_LAYERS:
        experts = experts_of(merged, layer)
        assert type(experts) is Fp8Experts
        for tensor in ("gate_up_proj", "down_proj"):
            want = getattr(experts_of(stock, layer), tensor).detach()
            got = experts.dequantized(tensor, F32)
            codes, scale = experts.codes(tensor).view(torch.uint8), experts.scale(tensor)
            old_codes, old_scale = (
                before[layer][tensor].view(torch.uint8),
                before[layer][f"{tensor}_scale_inv"],
            )
            for expert in range(EXPERTS):
                if (layer, tensor, expert) == (1, "down_proj", untouched):
                    assert torch.equal(codes[expert], old_codes[expert])
                    assert torch.equal(scale[expert], old_scale[expert])
                    continue
                assert not torch.equal(codes[expert], old_codes[expert]), (layer, tensor, expert)
                if form == "per-tensor":  # one whole-matrix block: amax / 448, fresh
                    fresh = want[expert].abs().amax() / E4M3_MAX
                    torch.testing.assert_close(scale[expert].reshape(()), fresh, rtol=1e-6, atol=0)
                step = torch.maximum(want[expert].abs() / 8, scale[expert].amax() * 2.0**-9)
                assert bool(((got[expert] - want[expert]).abs() <= step).all()), (layer, tensor, expert)
