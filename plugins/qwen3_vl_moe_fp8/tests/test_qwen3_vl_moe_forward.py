"""The fused-loss forward on a mixture-of-experts VLM: the loss, its gradients (through the experts and the
image) and the router's load-balancing loss equal the stock forward's on the same weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from moe_checkpoints import PLUGIN, reference_model
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeCausalLMOutputWithPast

import automodel_plugins

GRADIENTS = (
    "model.language_model.layers.1.mlp.experts.gate_up_proj",
    "model.language_model.layers.0.mlp.experts.down_proj",
    "model.language_model.layers.0.mlp.gate.weight",
    "model.visual.blocks.0.attn.qkv.weight",
    "lm_head.weight",
)


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture
def models(moe_checkpoint: Any) -> tuple[Any, Any]:
    """fp32: ours (forward overridden) and the stock class holding the reference weights (stock forward)."""
    path = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    ours = automodel_plugins.from_pretrained(path, dtype=torch.float32)
    return ours, reference_model(path, dtype=torch.float32)


@pytest.mark.parametrize("router_logits", [False, True], ids=["loss", "loss-plus-aux-loss"])
def test_fused_loss_and_gradients_equal_stock(
    models: tuple[Any, Any], image_batch: Any, router_logits: bool
) -> None:
    ours, stock = models
    assert ours.automodel_composition.forward_overridden and "forward" not in vars(stock)
    got = ours(**image_batch, output_router_logits=router_logits)
    want = stock(**image_batch, output_router_logits=router_logits)
    assert type(got) is Qwen3VLMoeCausalLMOutputWithPast and got.image_outputs is not None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    if router_logits:
        assert got.aux_loss is not None and len(got.router_logits) == len(want.router_logits) == 2
        torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=0, rtol=0)
    else:
        assert got.aux_loss is None and want.aux_loss is None
    got.loss.backward()
    want.loss.backward()
    for name in GRADIENTS:
        torch.testing.assert_close(
            ours.get_parameter(name).grad, stock.get_parameter(name).grad, atol=1e-5, rtol=0, msg=name
        )


def test_config_asking_for_router_logits_adds_the_aux_loss(models: tuple[Any, Any], image_batch: Any) -> None:
    """``text_config.output_router_logits`` (how a training recipe turns the balancing loss on) is honoured
    as stock honours it, and the coefficient is the config's."""
    ours, stock = models
    for model in (ours, stock):
        model.config.text_config.output_router_logits = True
        model.config.text_config.router_aux_loss_coef = 0.5
    got, want = ours(**image_batch), stock(**image_batch)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=0, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    without = ours(**image_batch, output_router_logits=False)
    assert without.aux_loss is None
    torch.testing.assert_close(got.loss - without.loss, 0.5 * got.aux_loss, atol=1e-5, rtol=0)


def test_skip_logits_keeps_the_loss_and_drops_the_logits(moe_checkpoint: Any, image_batch: Any) -> None:
    model = automodel_plugins.from_pretrained(moe_checkpoint(experts="per-expert"), skip_logits=True)
    out = model(**image_batch)
    assert out.logits is None and torch.isfinite(out.loss)
    assert model(**{k: v for k, v in image_batch.items() if k != "labels"}).logits is not None
