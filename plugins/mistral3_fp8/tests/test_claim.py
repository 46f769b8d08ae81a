"""Which configs the plugin claims: Mistral3 with a Ministral3 text model, FP8 or unquantized; nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from automodel_plugins_mistral3_fp8 import plugin
from mistral3_checkpoints import PLUGIN, Checkpoints, CheckpointSpec, ModelSpec, tiny_config
from transformers import AutoConfig, LlamaConfig, Qwen2VLConfig

from automodel_plugins import Claim, Decline, NoPluginClaimError
from automodel_plugins.registry import Registry
from automodel_plugins.sources import load_config

FP8 = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "weight_block_size": None,
    "dequantize": False,
    "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def with_quantization(config: Any, quantization: dict[str, Any] | None) -> Any:
    if quantization is not None:
        config.quantization_config = dict(quantization)
    return config


@pytest.mark.parametrize(
    ("quantization", "granularity"),
    [(FP8, "per-tensor"), ({**FP8, "weight_block_size": [128, 128]}, "128x128 block")],
)
def test_fp8_mistral3_with_ministral3_is_claimed(quantization: dict[str, Any], granularity: str) -> None:
    claim = plugin.claim_config(with_quantization(tiny_config(), quantization))
    assert isinstance(claim, Claim)
    assert granularity in claim.reason and "FP8" in claim.reason


def test_unquantized_mistral3_is_claimed() -> None:
    claim = plugin.claim_config(tiny_config())
    assert isinstance(claim, Claim) and "unquantized" in claim.reason


@pytest.mark.parametrize("quantization", [None, FP8])
def test_mistral_small_text_model_is_declined_with_the_reason(quantization: dict[str, Any] | None) -> None:
    """Mistral Small 3.x: a Mistral3 VLM whose text model is ``mistral``, not ``ministral3``."""
    config = with_quantization(tiny_config(ModelSpec(text_type="mistral")), quantization)
    assert config.text_config.model_type == "mistral"
    assert plugin.claim_config(config) == Decline(
        reason="mistral3 VLM with text model 'mistral': only 'ministral3' or 'mistral4' is served"
    )


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
        Qwen2VLConfig(),
        AutoConfig.for_model("mistral"),
    ],
    ids=["llama", "qwen2_vl", "mistral-text"],
)
@pytest.mark.parametrize("quantization", [None, FP8])
def test_other_model_types_are_not_claimed(config: Any, quantization: dict[str, Any] | None) -> None:
    assert plugin.claim_config(with_quantization(config, quantization)) is None


@pytest.mark.parametrize(
    "quantization", [AWQ, {"quant_method": "compressed-tensors"}, {"quant_method": "bitsandbytes"}]
)
def test_other_quantization_methods_are_declined_with_the_method(quantization: dict[str, Any]) -> None:
    answer = plugin.claim_config(with_quantization(tiny_config(), quantization))
    assert isinstance(answer, Decline) and f"quant_method {quantization['quant_method']!r}" in answer.reason


def test_installed_entry_point_claims_generated_checkpoints(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    """Through the real entry point and ``config.json`` files: FP8 (both granularities) and BF16 claimed."""
    for spec in (CheckpointSpec(), CheckpointSpec(block_size=(16, 16)), CheckpointSpec(quantized=False)):
        assert registry.resolve(load_config(checkpoints(spec))) == PLUGIN


def test_unclaimed_checkpoint_with_require_plugin_raises(
    registry: Registry, checkpoints: Checkpoints
) -> None:
    config = load_config(checkpoints(model=ModelSpec(text_type="mistral")))
    assert registry.resolve(config) is None
    with pytest.raises(NoPluginClaimError, match="mistral3") as caught:
        registry.resolve(config, require_plugin=True)
    assert (
        f"{PLUGIN} (mistral3 VLM with text model 'mistral': only 'ministral3' or 'mistral4' is served)"
        in str(caught.value)
    )
