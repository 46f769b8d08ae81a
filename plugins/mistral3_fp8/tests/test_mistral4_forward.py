"""Mistral 4's rotary (yarn over ``qk_rope_head_dim`` with Llama-4 attention scaling) and the fused-loss forward,
after a load that builds the model on meta: buffers equal stock's normal init bit for bit, are repaired again at
first call when garbled, and a labelled call's fused loss (text and image) equals ``F.cross_entropy`` of the
stock model's logits with autograd, router aux loss included when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import PLUGIN, ROPE, reference_model, tiny_model, write_checkpoint

import automodel_plugins
from automodel_plugins.model.rotary import find_rotary_modules
from automodel_plugins.testing.compare import assert_same_rotary
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch

F32 = torch.float32


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tiny_model(), tmp_path_factory.mktemp("mistral4") / "fp8", "per-tensor")


def text_rotary(model: Any) -> torch.nn.Module:
    return model.get_submodule("model.language_model.rotary_emb")


def test_rotary_is_yarn_over_the_rope_dims_with_its_scaling(path: Path) -> None:
    """Guards the comparison: the tiny config exercises what Small 4's does (yarn, mscale != 1, partial
    rotary: inv_freq over ``qk_rope_head_dim`` only), and the loaded model's buffers equal stock's init."""
    ours = automodel_plugins.from_pretrained(path, dtype=torch.bfloat16)
    rotary = text_rotary(ours)
    text = ours.config.text_config
    assert (
        rotary.rope_type == "yarn"
        and text.rope_parameters["llama_4_scaling_beta"] == ROPE["llama_4_scaling_beta"]
    )
    assert rotary.inv_freq.dtype == F32 and rotary.inv_freq.numel() == text.qk_rope_head_dim // 2
    assert rotary.attention_scaling != 1.0
    # Llama-4 scaling moves the queries of positions past original_max_position_embeddings: the test batches
    # (12 and 16 tokens) reach them
    from transformers.models.mistral4.modeling_mistral4 import get_llama_4_attn_scale

    scale = get_llama_4_attn_scale(
        torch.arange(12)[None], ROPE["llama_4_scaling_beta"], ROPE["original_max_position_embeddings"]
    )
    assert (scale.flatten() > 1).any()
    assert_same_rotary(ours, reference_model(path))


def test_garbled_rotary_is_repaired_at_first_call(path: Path) -> None:
    ours = automodel_plugins.from_pretrained(path, dtype=torch.bfloat16)
    expected = reference_model(path)
    for _, module in find_rotary_modules(ours):
        for name in module._non_persistent_buffers_set:
            module.get_buffer(name).fill_(float("nan"))
    batch = mistral3_image_batch(ours.config, batch=1, seq=12, image_hw=(32, 32), labels=False)
    with torch.no_grad():  # an image: the vision tower's rotary runs too
        ours(**batch)
    assert_same_rotary(ours, expected)


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_fused_loss_and_gradients_equal_cross_entropy(path: Path, image: bool) -> None:
    ours = automodel_plugins.from_pretrained(path, dtype=F32, skip_logits=True)
    reference = reference_model(path, dtype=F32)
    for model in (ours, reference):
        model.set_experts_implementation("eager")
    if image:
        batch = mistral3_image_batch(ours.config, batch=2, seq=16, image_hw=(32, 32))
    else:
        batch = text_batch(ours.config)
        batch["labels"][0, :5] = -100
    out = ours(**batch)
    assert out.logits is None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = reference(**inputs).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    expected.backward()
    for name in (
        "lm_head.weight",
        "model.language_model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.language_model.layers.2.mlp.experts.gate_up_proj",
        "model.language_model.layers.1.mlp.gate.weight",
        "model.language_model.embed_tokens.weight",
    ):
        torch.testing.assert_close(
            ours.get_parameter(name).grad, reference.get_parameter(name).grad, rtol=1e-4, atol=1e-6
        )
