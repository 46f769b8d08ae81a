"""A Mistral 4 checkpoint saved in its source format (``save_pretrained``'s default ``quantization="source"``)
right after the load is the source, byte for byte, in every form (fused experts with one scale per expert, fused
block grids, per-expert pieces, BF16), loaded dequantized or with the experts kept FP8; after a change to one
tensor, every other tensor is still the source's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mistral4_checkpoints import FORMS, PLUGIN, stored_tensors, tiny_model, write_checkpoint

import automodel_plugins


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def different(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    keys = sorted(set(first) ^ set(second))
    for key in set(first) & set(second):
        a, b = first[key], second[key]
        if (
            a.dtype != b.dtype
            or a.shape != b.shape
            or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        ):
            keys.append(key)
    return keys


CASES = [(form, True) for form in FORMS] + [
    (form, False) for form in FORMS if form != "bf16"
]  # an unquantized checkpoint has nothing to keep FP8


@pytest.mark.filterwarnings("ignore:dequantize=False")  # unaligned per-expert pieces: dequantized, as tested
@pytest.mark.parametrize(("form", "dequantize"), CASES)
def test_source_save_is_the_source(tmp_path: Path, form: str, dequantize: bool) -> None:
    source = write_checkpoint(tiny_model(), tmp_path / "source", form)
    model = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16, dequantize=dequantize)
    automodel_plugins.save_pretrained(model, tmp_path / "saved")
    assert different(stored_tensors(tmp_path / "saved"), stored_tensors(source)) == []


def test_untouched_tensors_stay_byte_identical(tmp_path: Path) -> None:
    source = write_checkpoint(tiny_model(), tmp_path / "source", "per-tensor")
    model = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16, dequantize=False)
    changed = "model.language_model.layers.1.post_attention_layernorm.weight"
    with torch.no_grad():
        model.get_parameter(changed).add_(1.0)
    automodel_plugins.save_pretrained(model, tmp_path / "saved")
    key = "language_model.model.layers.1.post_attention_layernorm.weight"
    assert different(stored_tensors(tmp_path / "saved"), stored_tensors(source)) == [key]
