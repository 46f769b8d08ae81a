"""compressed-tensors' per-tensor FP8 (FP8 static, and FP8_DYNAMIC's ``strategy: "tensor"``) stores each
``weight_scale`` (and static ``input_scale``) with shape ``[1]``, not 0-d: the Mistral 4 per-tensor fixture of
``test_compressed_tensors_hf.py`` rewritten in that real form loads like the reference (dequantized and
FP8-resident), and every save of it keeps the form the source had: ``"source"`` writes ``[1]`` back (byte for
byte), the resident layers show ``[1]`` in ``state_dict()``, and ``"fp8-tensor"`` keeps the source scales (as
transformers' 0-d ``weight_scale_inv``). The 0-d form keeps its own tests there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import edit_tensors
from mistral4_checkpoints import reference_model, stored_tensors, tiny_model, write_checkpoint
from test_compressed_tensors_hf import as_compressed_tensors, batches, eager

import automodel_plugins
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict

BF16 = torch.bfloat16
PLUGIN = "mistral3_fp8"
PER_TENSOR = ("weight_scale", "input_scale")


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def one_element(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fine-grained original, its compressed-tensors copy with every 0-d scale stored ``[1]``)."""
    root = tmp_path_factory.mktemp("ct-one-element")
    original = write_checkpoint(tiny_model(), root / "fg", "per-tensor", block=(16, 16))
    path = as_compressed_tensors(original, root / "ct")

    def one_element_scales(tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            if key.endswith(PER_TENSOR) and value.dim() == 0:
                tensors[key] = value.reshape(1)

    edit_tensors(path, one_element_scales)
    stored = stored_tensors(path)
    shapes = {tuple(v.shape) for k, v in stored.items() if k.endswith(PER_TENSOR) and ".experts." not in k}
    assert shapes == {(1,)}, shapes
    return original, path


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8-resident"])
def test_one_element_scales_load_like_the_reference(one_element: tuple[Path, Path], dequantize: bool) -> None:
    original, path = one_element
    ours = eager(automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=dequantize))
    expected = eager(reference_model(original))
    if dequantize:
        assert_same_state_dict(ours, expected)
    else:
        layer = ours.model.language_model.layers[0].self_attn.q_b_proj
        assert isinstance(layer, Fp8Linear) and layer.weight_scale_inv.shape == ()
        key = "model.language_model.layers.0.self_attn.q_b_proj.weight_scale"
        assert tuple(ours.state_dict()[key].shape) == (1,)  # shown as compressed-tensors stores it
    for inputs in batches(expected.config):
        assert_same_logits(ours, expected, inputs)


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8-resident"])
def test_source_save_writes_the_one_element_form_back(
    one_element: tuple[Path, Path], tmp_path: Path, dequantize: bool
) -> None:
    _, path = one_element
    model = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=dequantize)
    report = automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert report.scales_fresh == 0 and report.scales_kept == report.quantized > 0
    saved, source = stored_tensors(tmp_path / "out"), stored_tensors(path)
    assert saved.keys() == source.keys()
    for key, value in source.items():
        assert saved[key].dtype == value.dtype and tuple(saved[key].shape) == tuple(value.shape), key
        assert torch.equal(saved[key].view(torch.uint8), value.view(torch.uint8)), key
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((path / "config.json").read_text())["quantization_config"]


def test_fp8_tensor_save_keeps_the_one_element_source_scales(
    one_element: tuple[Path, Path], tmp_path: Path
) -> None:
    _, path = one_element
    model = automodel_plugins.from_pretrained(path, dtype=BF16)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="fp8-tensor")
    saved, source = stored_tensors(tmp_path / "out"), stored_tensors(path)
    key = "language_model.model.layers.0.self_attn.q_b_proj"
    assert tuple(saved[f"{key}.weight_scale_inv"].shape) == ()  # transformers' form
    assert torch.equal(saved[f"{key}.weight_scale_inv"].reshape(1), source[f"{key}.weight_scale"].float())
    assert torch.equal(saved[f"{key}.weight"].view(torch.uint8), source[f"{key}.weight"].view(torch.uint8))
