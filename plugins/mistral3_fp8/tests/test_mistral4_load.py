"""Mistral 4 (Mistral Small 4's HF form) in every on-disk form of its experts: the load equals the stock
``Mistral3ForConditionalGeneration`` holding a reference dequantization written in ``mistral4_checkpoints``
(bit for bit: weights, rotary buffers, logits with and without an image), and ``dequantize=False`` keeps the
experts FP8 with the same logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import (
    EXPERTS,
    FORMS,
    LAYERS,
    PLUGIN,
    reference_model,
    stored_tensors,
    tiny_model,
    write_checkpoint,
)
from safetensors.torch import save_file

import automodel_plugins
from automodel_plugins.errors import CheckpointError, ScaleError
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


def test_one_scale_per_expert_is_held_as_stored(checkpoints: dict[str, Path]) -> None:
    """Small 4's fused experts stay FP8 as the file holds them: the codes byte for byte, and the ``[E, 1, 1]``
    scales (gate and up sharing one per expert) as the fp32 grid of one whole-matrix block per expert."""
    path = checkpoints["per-tensor"]
    ours = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False)
    stored = stored_tensors(path)
    for layer in range(1, LAYERS):
        experts = ours.get_submodule(f"model.language_model.layers.{layer}.mlp.experts")
        for projection in ("gate_up_proj", "down_proj"):
            key = f"language_model.model.layers.{layer}.mlp.experts.{projection}"
            assert torch.equal(getattr(experts, projection).view(torch.uint8), stored[key].view(torch.uint8))
            scale = experts.get_buffer(f"{projection}_scale_inv")
            assert scale.shape == (EXPERTS, 1, 1) and scale.dtype == torch.float32
            assert torch.equal(scale, stored[f"{key}_scale_inv"].float())


def rewrite(path: Path, edit: Any) -> Path:
    tensors = stored_tensors(path)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_an_expert_scale_of_another_shape_is_refused_by_name(tmp_path: Path) -> None:
    """One scale per expert must be ``[E, 1, 1]``; a flat ``[E]`` is not guessed at."""
    key = "language_model.model.layers.1.mlp.experts.gate_up_proj_scale_inv"
    path = write_checkpoint(tiny_model(), tmp_path / "flat", "per-tensor")
    rewrite(path, lambda tensors: tensors.__setitem__(key, tensors[key].reshape(-1)))
    with pytest.raises(ScaleError, match=r"gate_up_proj_scale_inv.*shape \(4,\)"):
        automodel_plugins.from_pretrained(path, dtype=BF16)


def test_fused_and_per_expert_experts_together_are_refused(tmp_path: Path) -> None:
    fused = stored_tensors(write_checkpoint(tiny_model(), tmp_path / "fused", "block-fused"))
    path = write_checkpoint(tiny_model(), tmp_path / "mixed", "block-per-expert")
    layer = "language_model.model.layers.2.mlp.experts."

    def mix(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith(layer)]:
            del tensors[key]
        tensors.update({k: v for k, v in fused.items() if k.startswith(layer)})

    rewrite(path, mix)
    with pytest.raises(CheckpointError, match="mixes per-expert"):
        automodel_plugins.from_pretrained(path, dtype=BF16)
