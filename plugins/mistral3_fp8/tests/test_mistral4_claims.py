"""Which Mistral 4 configs the plugin claims (a ``mistral3`` VLM with a ``mistral4`` text model, and the text-only
``mistral4``: FP8 or unquantized), what ``list --config`` and ``inspect`` say of them, and the text-only
``Mistral4ForCausalLM`` load against the stock class holding a reference dequantization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from automodel_plugins_mistral3_fp8 import plugin
from mistral4_checkpoints import (
    BLOCK,
    EXPERTS,
    LAYERS,
    PLUGIN,
    reference_model,
    tiny_config,
    tiny_model,
    tiny_text_config,
    tiny_text_model,
    write_checkpoint,
)

import automodel_plugins
from automodel_plugins import Claim, Decline
from automodel_plugins.errors import CheckpointError
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.testing.compare import assert_same_logits, assert_same_rotary, assert_same_state_dict
from automodel_plugins.testing.tiny_models import text_batch

FP8 = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None}
ATTENTION_LINEARS = 5  # q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def with_quantization(config: Any, quantization: dict[str, Any] | None) -> Any:
    if quantization is not None:
        config.quantization_config = dict(quantization)
    return config


@pytest.mark.parametrize("make", [tiny_config, tiny_text_config], ids=["vlm", "text-only"])
@pytest.mark.parametrize(
    ("quantization", "shown"),
    [
        (None, "unquantized"),
        (FP8, "per-tensor FP8"),
        ({**FP8, "weight_block_size": [128, 128]}, "128x128 block"),
    ],
)
def test_mistral4_is_claimed(make: Any, quantization: dict[str, Any] | None, shown: str) -> None:
    claim = plugin.claim_config(with_quantization(make(), quantization))
    assert isinstance(claim, Claim) and "mistral4" in claim.reason and shown in claim.reason


def test_compressed_tensors_is_declined_with_the_method() -> None:
    """Mistral Large 3's quantization (compressed-tensors FP8_BLOCK) is not read by this HF-form path."""
    answer = plugin.claim_config(with_quantization(tiny_config(), {"quant_method": "compressed-tensors"}))
    assert isinstance(answer, Decline) and "'compressed-tensors'" in answer.reason


def test_list_and_inspect_show_the_claim_and_plan(tmp_path: Path, run_cli: Any) -> None:
    path = write_checkpoint(tiny_model(), tmp_path / "small4", "per-tensor")
    listing = run_cli("list", "--config", str(path / "config.json"), "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["claimed_by"] == PLUGIN
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["plugin"] == PLUGIN and described["bytes_read"] == 0
    load = described["load"]
    assert (load["adapter"], load["layout"], load["adapter_details"]) == (
        "Mistral4ExpertsAdapter",
        "legacy",
        {"experts": "fused"},
    )
    moe_layers = LAYERS - 1
    linears = ATTENTION_LINEARS * LAYERS + 3 * LAYERS  # dense MLP in layer 0, shared experts in the others
    fused = 2 * moe_layers
    assert load["fp8_tensors"] == load["scale_keys"] == load["dropped_keys"] == linears + fused
    assert load["fp8_resident_layers"] == linears + fused and load["fp8_not_resident"] == 0


def test_inspect_plans_per_expert_pieces(tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model(), tmp_path / "per-expert", "block-per-expert")
    load = describe_checkpoint(path)["load"]
    assert load["adapter_details"] == {"experts": "per-expert"}
    assert load["granularity"] == f"block {BLOCK[0]}x{BLOCK[1]}"
    assert load["assembled_tensors"] == 2 * (LAYERS - 1)
    assert load["pieces"] == 3 * EXPERTS * (LAYERS - 1)


@pytest.mark.parametrize("form", ["per-tensor", "block-fused", "block-per-expert"])
def test_text_only_mistral4_equals_reference(tmp_path: Path, form: str) -> None:
    path = write_checkpoint(tiny_text_model(), tmp_path / form, form)
    ours = automodel_plugins.from_pretrained(path, dtype=BF16).eval()
    expected = reference_model(path)
    for model in (ours, expected):
        model.set_experts_implementation("eager")
    assert type(ours).__name__ == "Mistral4ForCausalLM"
    assert_same_state_dict(ours, expected)
    assert_same_rotary(ours, expected)
    assert_same_logits(ours, expected, text_batch(expected.config, batch=2, seq=12, labels=False))


def test_vlm_keys_under_a_text_only_config_are_refused_by_name(tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model(), tmp_path / "vlm", "per-tensor")
    config = tiny_text_config(architectures=["Mistral4ForCausalLM"]).to_dict()
    config["quantization_config"] = json.loads((path / "config.json").read_text())["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text-only mistral4 model"):
        automodel_plugins.from_pretrained(path, dtype=BF16)
