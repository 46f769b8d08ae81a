"""What the Qwen3-VL-MoE plugin claims, that no other installed plugin competes for it, and its packaging."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from automodel_plugins_qwen3_vl_moe_fp8 import plugin
from moe_checkpoints import PLUGIN, tiny_config
from transformers import AutoConfig

from automodel_plugins import Claim, Decline
from automodel_plugins.registry import Registry

QWEN_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head", "model.visual", "model.language_model.layers.0.mlp.gate"],
}
"""``quantization_config`` in the spelling of Qwen's ``Qwen3-VL-*-A*B-Instruct-FP8`` releases."""


def configured(quantization: dict[str, Any] | None) -> Any:
    config = tiny_config()
    if quantization is not None:
        config.quantization_config = dict(quantization)
    return config


def test_claims_block_fp8_as_qwen_ships_it() -> None:
    claim = plugin.claim_config(configured(QWEN_FP8))
    assert claim == Claim(reason="qwen3_vl_moe VLM (mixture of experts), 128x128 block FP8 weights")


def test_claims_unquantized() -> None:
    assert plugin.claim_config(configured(None)) == Claim(
        reason="qwen3_vl_moe VLM (mixture of experts), unquantized"
    )


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_declines_other_quantization_methods(method: str) -> None:
    answer = plugin.claim_config(configured({"quant_method": method}))
    assert isinstance(answer, Decline) and repr(method) in answer.reason


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_vl_moe_text", "mistral3", "qwen3_moe"])
def test_other_model_types_are_not_ours(model_type: str) -> None:
    assert plugin.claim_config(AutoConfig.for_model(model_type)) is None


@pytest.fixture
def installed() -> Registry:
    """Every installed plugin, as a user's ``from_pretrained`` sees them."""
    registry = Registry.from_entry_points(selection=None)
    loaded = {r.name for r in registry.plugins() if r.status == "loaded"}
    assert {"mistral3_fp8", "qwen3_vl_fp8", PLUGIN} <= loaded
    return registry


@pytest.mark.parametrize("quantization", [QWEN_FP8, None], ids=["fp8", "unquantized"])
def test_only_this_plugin_claims_qwen3_vl_moe(installed: Registry, quantization: Any) -> None:
    """The dense Qwen3-VL plugin declines, pointing here; the Mistral3 plugin does not answer."""
    verdicts = {v.plugin: v for v in installed.claims(configured(quantization))}
    assert [name for name, v in verdicts.items() if v.claimed] == [PLUGIN]
    assert "qwen3_vl_moe_fp8" in verdicts["qwen3_vl_fp8"].reason
    assert installed.resolve(configured(quantization)) == PLUGIN


def test_dense_qwen3_vl_is_not_claimed_here(installed: Registry) -> None:
    from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_config

    assert plugin.claim_config(tiny_qwen3_vl_config()) is None
    assert installed.resolve(tiny_qwen3_vl_config()) == "qwen3_vl_fp8"


def test_plugin_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, automodel_plugins_qwen3_vl_moe_fp8.plugin; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_list_config_names_the_winner(moe_checkpoint: Any, run_cli: Any) -> None:
    path = moe_checkpoint(experts="per-expert")
    result = run_cli("list", "--config", str(path), "--json", env={"AUTOMODEL_PLUGINS": None})
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["claimed_by"] == PLUGIN
    (record,) = [p for p in listing["plugins"] if p["name"] == PLUGIN]
    assert record["distribution"] == "automodel-plugins-qwen3-vl-moe-fp8" and record["status"] == "loaded"
    assert record["hooks"] == ["claim_config", "forward_override", "post_materialize", "state_dict_adapter"]
