"""PEFT's own merge (``merge_and_unload``, ``merge_adapter`` / ``unmerge_adapter``) on an FP8-resident base,
without ``register_fp8_lora``: every LoRA layer PEFT puts over an ``Fp8Linear`` is an ``Fp8LoraLinear``.

Before, PEFT's stock ``lora.Linear`` merged with ``base_layer.weight.data += delta`` into the FP8 codes: a raw
``RuntimeError`` (result type Float can't be cast to Byte), and with ``safe_merge=True`` the delta cast to
``uint8`` and added to the codes without a word. References: ``automodel_plugins.merge_lora`` on the same
model, and (independent of the resident path) the same LoRA merged by PEFT into the dequantized model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.tiny_models import mistral3_image_batch, tiny_mistral3_config

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj", "linear_1"]  # FP8 layers, and the (BF16) projector
MERGED_FP8 = 3 * 2  # q, v, down in each of the 2 text layers
F32 = torch.float32


@pytest.fixture(scope="module", params=["per-tensor", "block"])
def checkpoint(request: pytest.FixtureRequest, fp8_checkpoint_factory: Any) -> Path:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config(intermediate_size=136))
    block = (32, 32) if request.param == "block" else None
    return fp8_checkpoint_factory(model, name=f"mistral3-merge-{request.param}", block_size=block)


def with_lora(checkpoint: Path, plugin_registry: Any, *, dequantize: bool = False) -> Any:
    """The same random (non-zero) LoRA on the resident or the dequantized model."""
    model = automodel_plugins.from_pretrained(
        checkpoint, dtype=F32, dequantize=dequantize, registry=plugin_registry("mistral3_fp8")
    )
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def inputs() -> dict[str, torch.Tensor]:
    return mistral3_image_batch(tiny_mistral3_config(), batch=2, seq=15, image_rows=1, labels=False)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(**inputs()).logits


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("safe_merge", [False, True])
def test_peft_merge_and_unload_equals_merge_lora_and_the_dequantized_merge(
    checkpoint: Path, plugin_registry: Any, safe_merge: bool
) -> None:
    resident = with_lora(checkpoint, plugin_registry)
    q_proj = resident.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj) is automodel_plugins.Fp8LoraLinear  # chosen for the FP8 base, nothing registered
    before = logits(resident)
    merged = resident.merge_and_unload(safe_merge=safe_merge)
    reference = automodel_plugins.merge_lora(with_lora(checkpoint, plugin_registry))
    dequantized = with_lora(checkpoint, plugin_registry, dequantize=True).merge_and_unload()

    assert type(merged) is Mistral3ForConditionalGeneration
    assert len([m for m in merged.modules() if isinstance(m, Fp8Linear)]) == 14 - MERGED_FP8
    got, expected, independent = (
        linear_weights(merged),
        linear_weights(reference),
        linear_weights(dequantized),
    )
    assert sorted(got) == sorted(expected)
    for name, weight in got.items():
        assert weight.dtype == F32 and not weight.requires_grad, name
        assert torch.equal(weight, expected[name]), name
        assert torch.equal(weight, independent[name]), (
            name
        )  # dequantized weight + the same delta, bit for bit
    out = logits(merged)
    assert torch.equal(out, logits(reference)) and torch.equal(out, logits(dequantized))
    torch.testing.assert_close(out, before, rtol=0, atol=1e-5)  # the merged model computes the LoRA model


def test_peft_merge_adapter_and_unmerge_adapter_restore_the_fp8_base_exactly(
    checkpoint: Path, plugin_registry: Any
) -> None:
    model = with_lora(checkpoint, plugin_registry)
    q_proj = model.base_model.model.model.language_model.layers[1].self_attn.q_proj
    base, codes = q_proj.base_layer, q_proj.base_layer.weight.clone()
    before = logits(model)
    model.merge_adapter()
    assert type(q_proj.base_layer) is torch.nn.Linear
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert q_proj.base_layer is base and torch.equal(base.weight, codes)  # the FP8 base back, bit for bit
    # (the BF16 projector's stock unmerge subtracts the delta again: within rounding, not bit for bit)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)


def test_a_reloaded_adapter_merges_with_peft_too(
    checkpoint: Path, plugin_registry: Any, tmp_path: Path
) -> None:
    trained = with_lora(checkpoint, plugin_registry)
    trained.save_pretrained(tmp_path / "adapter")
    expected = automodel_plugins.merge_lora(trained)
    base = automodel_plugins.from_pretrained(
        checkpoint, dtype=F32, dequantize=False, registry=plugin_registry("mistral3_fp8")
    )
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    for name, weight in linear_weights(expected).items():
        assert torch.equal(linear_weights(reloaded)[name], weight), name


def test_saving_after_peft_merge_writes_what_merge_lora_writes(
    checkpoint: Path, plugin_registry: Any, tmp_path: Path
) -> None:
    """``quantization="source"``: the merged layers re-quantized under the save's scale policy, the others'
    codes as loaded; the same files as after ``merge_lora``, and they load back to the same logits."""
    merged = with_lora(checkpoint, plugin_registry).merge_and_unload()
    reference = automodel_plugins.merge_lora(with_lora(checkpoint, plugin_registry))
    report = automodel_plugins.save_pretrained(merged, tmp_path / "peft", quantization="source")
    automodel_plugins.save_pretrained(reference, tmp_path / "merge_lora", quantization="source")
    assert report.quantized == 14
    got, expected = (
        load_file(tmp_path / "peft" / "model.safetensors"),
        load_file(tmp_path / "merge_lora" / "model.safetensors"),
    )
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():  # FP8 codes compared as bytes, everything else as values
        same = got[key].dtype == tensor.dtype and torch.equal(
            got[key].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)
        )
        assert same, key
    registry = plugin_registry("mistral3_fp8")
    back = automodel_plugins.from_pretrained(tmp_path / "peft", dtype=F32, registry=registry)
    assert torch.equal(
        logits(back),
        logits(automodel_plugins.from_pretrained(tmp_path / "merge_lora", dtype=F32, registry=registry)),
    )
