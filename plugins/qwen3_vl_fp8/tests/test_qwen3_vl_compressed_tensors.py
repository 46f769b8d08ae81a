"""Qwen3-VL (dense) in llm-compressor's compressed-tensors FP8: FP8_DYNAMIC (per-channel ``[out, 1]`` scales)
and FP8_BLOCK (32x32: partial edge blocks on the 200-wide MLP), the ignore list of llm-compressor's Qwen3-VL
example (head and vision tower BF16; ``re:.*mlp.gate$`` matches nothing in a dense model).

References: the fine-grained checkpoint with the same codes and scales, dequantized by
``automodel_plugins.testing.compare.reference_model`` (codes times the expanded scale, read with safetensors),
held by the stock class; ``dequantize=False`` keeps the text linears FP8 with the same logits; a source save is
the source, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llm_compressor_checkpoints import CHANNEL, as_llm_compressor
from mistral4_checkpoints import stored_tensors
from transformers import Qwen3VLForConditionalGeneration

import automodel_plugins
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict, reference_model

PLUGIN = "qwen3_vl_fp8"
BF16 = torch.bfloat16
FORMS = {
    "fp8-dynamic-channel": {"block_size": tuple(CHANNEL), "scale_dtype": BF16},
    "fp8-block-32": {"block_size": (32, 32)},
}


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def forms(
    qwen_model: Qwen3VLForConditionalGeneration,
    fp8_checkpoint_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, Path]]:
    """(fine-grained original, llm-compressor copy) per form: head and vision tower BF16, as ignored."""
    root = tmp_path_factory.mktemp("qwen3-vl-ct")
    out = {}
    for name, options in FORMS.items():
        original = fp8_checkpoint_factory(
            qwen_model,
            name=name,
            modules_to_not_convert=("model.visual", "lm_head"),
            activation_scale_name=None,
            quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"},
            **options,
        )
        out[name] = (original, as_llm_compressor(original, root / name))
    return out


@pytest.mark.parametrize("form", list(FORMS))
def test_loads_bit_identical_to_the_reference(forms: dict[str, Any], form: str, image_inputs: Any) -> None:
    original, path = forms[form]
    stored = stored_tensors(path)
    scale = stored["model.language_model.layers.0.mlp.gate_proj.weight_scale"]
    assert list(scale.shape) == ([200, 1] if form == "fp8-dynamic-channel" else [7, 2])
    ours = automodel_plugins.from_pretrained(path, dtype=BF16).eval()
    expected = reference_model(original)
    assert_same_state_dict(ours, expected)
    assert_same_logits(ours, expected, image_inputs)
    assert "compressed-tensors" in ours.automodel_composition.claim_reason


@pytest.mark.parametrize("form", list(FORMS))
def test_dequantize_false_keeps_fp8_with_the_same_logits(
    forms: dict[str, Any], form: str, image_inputs: Any
) -> None:
    original, path = forms[form]
    ours = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False).eval()
    layer = ours.model.language_model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(module, Fp8Linear)
    assert not isinstance(ours.model.visual.blocks[0].attn.qkv, Fp8Linear)
    assert not isinstance(ours.lm_head, Fp8Linear)
    assert_same_logits(ours, reference_model(original), image_inputs)


@pytest.mark.parametrize("dequantize", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_source_save_is_the_source(
    forms: dict[str, Any], tmp_path: Path, form: str, dequantize: bool
) -> None:
    _, path = forms[form]
    model = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=dequantize)
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    saved, source = stored_tensors(tmp_path / "out"), stored_tensors(path)
    assert saved.keys() == source.keys()
    for key, value in source.items():
        assert saved[key].dtype == value.dtype and torch.equal(
            saved[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), key
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((path / "config.json").read_text())["quantization_config"]


def test_requantizing_save_keeps_the_ignored_modules_bf16(forms: dict[str, Any], tmp_path: Path) -> None:
    """``quantization="fp8-block"`` writes transformers' ``fp8`` format: the vision tower and head the source
    kept BF16 stay BF16 (transformers' default list would quantize the vision tower), the config says so, and
    stock transformers reads it to the loaded values within one FP8 step."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from automodel_plugins.model.hf_layout import linear_weights
    from automodel_plugins.testing.compare import load_stock

    _, path = forms["fp8-dynamic-channel"]
    model = automodel_plugins.from_pretrained(path, dtype=BF16)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="fp8-block", block_size=8)
    section = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "fp8" and section["weight_block_size"] == [8, 8]
    stored, ours = stored_tensors(tmp_path / "out"), model.state_dict()
    stock = load_stock(tmp_path / "out").state_dict()
    for weight, module in linear_weights(model).items():
        kept = module.startswith(("model.visual", "lm_head"))
        assert (stored[weight].dtype == BF16) == kept, weight
        assert should_convert_module(module, section["modules_to_not_convert"]) == (not kept), module
        got, want = stock[weight].float(), ours[weight].float()
        if kept:
            assert torch.equal(got, want), weight
        else:
            assert torch.all((got - want).abs() <= want.abs() * 2.0**-3 + want.abs().amax() * 2.0**-9), weight
