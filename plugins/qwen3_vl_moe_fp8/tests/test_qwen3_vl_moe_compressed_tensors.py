"""Qwen3-VL-MoE in llm-compressor's compressed-tensors FP8 (what its Qwen3-VL-MoE example writes: per-expert
``mlp.experts.E.*_proj`` modules with their own ``weight_scale``, the routers, vision tower and head ignored):
FP8_DYNAMIC (per-channel ``[out, 1]`` scales) and FP8_BLOCK.

References: the fine-grained checkpoint with the same codes and scales, dequantized and assembled by hand in
``moe_checkpoints.py`` (independent of the host), held by the stock class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from llm_compressor_checkpoints import CHANNEL, as_llm_compressor
from moe_checkpoints import PLUGIN, reference_model, same_bytes, stored_tensors

import automodel_plugins
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict

BF16 = torch.bfloat16
FORMS = {
    "fp8-dynamic-channel": {"block_size": tuple(CHANNEL), "scale_dtype": BF16},
    "fp8-block-16": {"block_size": (16, 16)},
}
"""FP8_DYNAMIC writes BF16 ``[out, 1]`` scales; 16x16 blocks give the experts partial edge blocks (24 rows)."""


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module")
def forms(moe_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(fine-grained original, llm-compressor copy) per form."""
    root = tmp_path_factory.mktemp("qwen3-vl-moe-ct")
    out = {}
    for name, options in FORMS.items():
        original = moe_checkpoint(experts="per-expert", **options)
        out[name] = (original, as_llm_compressor(original, root / name))
    return out


@pytest.mark.parametrize("form", list(FORMS))
def test_loads_bit_identical_to_the_reference(forms: dict[str, Any], form: str, image_inputs: Any) -> None:
    original, path = forms[form]
    assert "weight_scale" in "".join(stored_tensors(path)) and "scale_inv" not in "".join(
        stored_tensors(path)
    )
    ours = automodel_plugins.from_pretrained(path, dtype=BF16).eval()
    expected = reference_model(original)
    assert_same_state_dict(ours, expected)
    assert_same_logits(ours, expected, image_inputs)
    assert "compressed-tensors" in ours.automodel_composition.claim_reason
    assert ours.automodel_composition.adapter["experts"] == "per-expert"


@pytest.mark.parametrize("form", list(FORMS))
def test_dequantize_false_keeps_fp8_with_the_same_logits(
    forms: dict[str, Any], form: str, image_inputs: Any
) -> None:
    """Attention stays FP8; per-channel experts too (every expert's rows start a scale row); 16x16 experts are
    dequantized with the reason (up rows start at 24, inside a block)."""
    original, path = forms[form]
    if form == "fp8-block-16":
        with pytest.warns(UserWarning, match="block boundary"):
            ours = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False).eval()
    else:
        ours = automodel_plugins.from_pretrained(path, dtype=BF16, dequantize=False).eval()
    attention = ours.model.language_model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(attention, name), Fp8Linear), name
    experts = ours.get_submodule("model.language_model.layers.0.mlp.experts")
    assert isinstance(experts, Fp8Experts) == (form != "fp8-block-16")
    assert not isinstance(ours.model.visual.blocks[0].attn.qkv, Fp8Linear)
    assert_same_logits(ours, reference_model(original), image_inputs)


@pytest.mark.parametrize("dequantize", [True, False])
@pytest.mark.parametrize("form", list(FORMS))
def test_source_save_is_the_source(
    forms: dict[str, Any], tmp_path: Path, form: str, dequantize: bool
) -> None:
    """Saved as it came: per-expert keys, ``weight_scale`` bytes, the compressed-tensors dict."""
    _, path = forms[form]
    kwargs = {"dequantize": dequantize}
    if form == "fp8-block-16" and not dequantize:
        with pytest.warns(UserWarning, match="block boundary"):
            model = automodel_plugins.from_pretrained(path, dtype=BF16, **kwargs)
    else:
        model = automodel_plugins.from_pretrained(path, dtype=BF16, **kwargs)
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert same_bytes(stored_tensors(tmp_path / "out"), stored_tensors(path)) == []
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((path / "config.json").read_text())["quantization_config"]
