"""Mistral 4 (Mistral Small 4's HF form) in every on-disk form of its experts: the load equals the stock
``Mistral3ForConditionalGeneration`` holding a reference dequantization written in ``mistral4_checkpoints``
(bit for bit: weights, rotary buffers, logits with and without an image), and ``dequantize=False`` keeps the
experts FP8 with the same logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import FORMS, LAYERS, PLUGIN, reference_model, tiny_model, write_checkpoint

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.testing.compare import assert_same_logits, assert_same_rotary, assert_same_state_dict
from automodel_plugins.testing.tiny_models import mistral3_image_batch, text_batch

BF16 = torch.bfloat16
ALIGNED = (8, 8)
"""24, 40, 48 and 64 are multiples of 8: every per-expert piece starts on a block boundary."""


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = tiny_model()
    root = tmp_path_factory.mktemp("mistral4")
    written = {form: write_checkpoint(model, root / form, form) for form in FORMS}
    written["aligned-per-expert"] = write_checkpoint(
        model, root / "aligned", "block-per-expert", block=ALIGNED
    )
    return written


def eager(model: Any) -> Any:
    """The stock experts loop (Fp8Experts' forward is that loop)."""
    model.set_experts_implementation("eager")
    return model


def batches(model: Any) -> list[dict[str, torch.Tensor]]:
    config = model.config
    image = mistral3_image_batch(config, batch=2, seq=16, image_hw=(32, 32), labels=False, dtype=BF16)
    return [text_batch(config, batch=2, seq=12, labels=False), image]


@pytest.mark.parametrize("form", FORMS)
def test_load_equals_reference(checkpoints: dict[str, Path], form: str) -> None:
    ours = eager(automodel_plugins.from_pretrained(checkpoints[form], dtype=BF16)).eval()
    expected = eager(reference_model(checkpoints[form]))
    assert_same_state_dict(ours, expected)
    assert_same_rotary(ours, expected)
    for inputs in batches(expected):
        assert_same_logits(ours, expected, inputs)


@pytest.mark.parametrize("form", ["per-tensor", "block-fused", "aligned-per-expert"])
def test_experts_stay_fp8(checkpoints: dict[str, Path], form: str) -> None:
    ours = eager(automodel_plugins.from_pretrained(checkpoints[form], dtype=BF16, dequantize=False)).eval()
    for layer in range(1, LAYERS):
        experts = ours.get_submodule(f"model.language_model.layers.{layer}.mlp.experts")
        assert isinstance(experts, Fp8Experts)
        assert experts.gate_up_proj.dtype == torch.uint8
    expected = eager(reference_model(checkpoints[form]))
    for inputs in batches(expected):
        assert_same_logits(ours, expected, inputs)


def test_unaligned_per_expert_pieces_are_dequantized_with_the_reason(checkpoints: dict[str, Path]) -> None:
    """With 16x16 blocks the up pieces start at row 24 of their expert's gate_up matrix: no stacked grid holds
    them, so the experts are dequantized at load (named in a warning), and the logits are still exact."""
    with pytest.warns(UserWarning, match="not on a 16x16 block boundary"):
        ours = automodel_plugins.from_pretrained(
            checkpoints["block-per-expert"], dtype=BF16, dequantize=False
        )
    ours = eager(ours).eval()
    assert not isinstance(ours.get_submodule("model.language_model.layers.1.mlp.experts"), Fp8Experts)
    expected = eager(reference_model(checkpoints["block-per-expert"]))
    for inputs in batches(expected):
        assert_same_logits(ours, expected, inputs)
