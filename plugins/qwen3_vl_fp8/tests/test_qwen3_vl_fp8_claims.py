"""What the Qwen3-VL plugin claims, and that it never competes with the Mistral3 plugin for a config."""

from __future__ import annotations

from typing import Any

import pytest
from automodel_plugins_qwen3_vl_fp8 import plugin
from transformers import AutoConfig, Mistral3Config, PixtralVisionConfig, Qwen2_5_VLConfig, Qwen3VLConfig
from transformers.models.ministral3 import Ministral3Config

from automodel_plugins import Claim, Decline
from automodel_plugins.registry import Registry
from automodel_plugins.sources import load_config

QWEN_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head", "model.visual.merger", "model.visual.deepstack_merger_list"],
}
"""``quantization_config`` in the spelling of Qwen's ``Qwen3-VL-*-FP8`` releases."""


def with_quantization(config: Any, quantization: dict[str, Any] | None) -> Any:
    config.quantization_config = quantization
    return config


def mistral3_config(quantization: dict[str, Any] | None = None) -> Mistral3Config:
    text = Ministral3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = PixtralVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    return with_quantization(Mistral3Config(text_config=text, vision_config=vision), quantization)


# --- the plugin's own answers -----------------------------------------------------------------------------


def test_claims_block_fp8_as_qwen_ships_it(qwen_config: Qwen3VLConfig) -> None:
    claim = plugin.claim_config(with_quantization(qwen_config, dict(QWEN_FP8)))
    assert claim == Claim(reason="qwen3_vl VLM, 128x128 block FP8 weights", priority=0)


def test_claims_a_config_read_from_config_json(qwen_config: Qwen3VLConfig, write_model_config: Any) -> None:
    """Through ``load_config``, as ``from_pretrained`` and ``list --config`` see it."""
    data = with_quantization(qwen_config, dict(QWEN_FP8)).to_dict()
    claim = plugin.claim_config(load_config(write_model_config(data)))
    assert claim is not None and "128x128 block FP8" in claim.reason


def test_claims_unquantized(qwen_config: Qwen3VLConfig) -> None:
    assert plugin.claim_config(qwen_config) == Claim(reason="qwen3_vl VLM, unquantized")


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "awq", "bits": 4},
        {"quant_method": "gptq", "bits": 4},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
    ],
    ids=["awq", "gptq", "compressed-tensors", "bitsandbytes"],
)
def test_declines_other_quantization_methods(
    qwen_config: Qwen3VLConfig, quantization: dict[str, Any]
) -> None:
    answer = plugin.claim_config(with_quantization(qwen_config, quantization))
    assert isinstance(answer, Decline) and repr(quantization["quant_method"]) in answer.reason


def test_per_tensor_fp8_is_claimed_too(qwen_config: Qwen3VLConfig) -> None:
    per_tensor = {**QWEN_FP8, "weight_block_size": None, "activation_scheme": "static"}
    claim = plugin.claim_config(with_quantization(qwen_config, per_tensor))
    assert claim is not None and claim.reason == "qwen3_vl VLM, per-tensor FP8 weights"


@pytest.mark.parametrize(
    ("change", "field"),
    [({"fmt": "e5m2"}, "quantization_config.fmt"), ({"weight_block_size": [0, 128]}, "weight_block_size")],
    ids=["e5m2", "zero-block"],
)
def test_unreadable_fp8_is_claimed_and_the_load_names_the_field(
    qwen_model: Any, fp8_checkpoint_factory: Any, plugin_registry: Any, change: dict[str, Any], field: str
) -> None:
    """Claimed (it is FP8 Qwen3-VL), so the load fails loudly naming the field, not in another loader."""
    import json

    import automodel_plugins
    from automodel_plugins.errors import UnsupportedQuantizationError

    path = fp8_checkpoint_factory(qwen_model, name="bad-fp8", block_size=(128, 128))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    assert plugin.claim_config(load_config(path)) is not None
    plugin_registry("qwen3_vl_fp8")
    with pytest.raises(UnsupportedQuantizationError, match=field):
        automodel_plugins.from_pretrained(path)


@pytest.mark.parametrize(
    "config",
    [
        Qwen2_5_VLConfig(),
        mistral3_config(dict(QWEN_FP8)),
        Qwen3VLConfig().text_config,
    ],
    ids=["qwen2_5_vl", "mistral3-fp8", "qwen3_vl_text-alone"],
)
def test_declines_other_model_types(config: Any) -> None:
    assert plugin.claim_config(config) is None


def test_declines_the_moe_variant_with_the_reason() -> None:
    answer = plugin.claim_config(AutoConfig.for_model("qwen3_vl_moe"))
    assert answer == Decline(
        reason="qwen3_vl_moe (mixture of experts): only the dense qwen3_vl is served here; "
        "the qwen3_vl_moe_fp8 plugin (automodel-plugins-qwen3-vl-moe-fp8) serves it"
    )


# --- both plugins installed -------------------------------------------------------------------------------


@pytest.fixture
def installed() -> Registry:
    """Every installed plugin, as a user's ``from_pretrained`` sees them."""
    registry = Registry.from_entry_points(selection=None)
    assert {"mistral3_fp8", "qwen3_vl_fp8"} <= {r.name for r in registry.plugins() if r.status == "loaded"}
    return registry


@pytest.mark.parametrize("quantization", [dict(QWEN_FP8), None], ids=["fp8", "unquantized"])
def test_qwen3_vl_config_claimed_only_by_this_plugin(
    installed: Registry, qwen_config: Qwen3VLConfig, quantization: Any
) -> None:
    config = with_quantization(qwen_config, quantization)
    assert _claimants(installed, config) == ["qwen3_vl_fp8"]
    assert installed.resolve(config) == "qwen3_vl_fp8"


@pytest.mark.parametrize(
    "quantization", [{**QWEN_FP8, "activation_scheme": "static"}, None], ids=["fp8", "unquantized"]
)
def test_mistral3_config_claimed_only_by_mistral3_plugin(installed: Registry, quantization: Any) -> None:
    config = mistral3_config(quantization)
    assert _claimants(installed, config) == ["mistral3_fp8"]
    assert installed.resolve(config) == "mistral3_fp8"


def _claimants(registry: Registry, config: Any) -> list[str]:
    verdicts = registry.claims(config)
    assert not [v for v in verdicts if v.error], verdicts
    return [v.plugin for v in verdicts if v.claimed]
