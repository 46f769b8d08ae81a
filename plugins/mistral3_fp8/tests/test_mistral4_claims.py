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
    NOT_CONVERTED,
    PLUGIN,
    is_quantized,
    legacy_key,
    reference_model,
    tiny_config,
    tiny_model,
    tiny_text_config,
    tiny_text_model,
    write_checkpoint,
)

import automodel_plugins
from automodel_plugins import Claim, Decline
from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec
from automodel_plugins.errors import CheckpointError
from automodel_plugins.model.stock import build_on_meta
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
    """compressed-tensors without a group the host reads (here: none at all) is declined naming the method;
    FP8 groups are claimed (``tests/test_compressed_tensors_hf.py``)."""
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


def small_4_config() -> Any:
    """A full-size Mistral Small 4 VLM config: transformers 5.25's ``Mistral4Config`` defaults (its docstring
    names ``mistralai/Mistral-Small-4-119B-2603``; not checked against the repo's config.json) under a default
    Pixtral tower, per-tensor FP8 with static activations as the HF form is described."""
    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    config = Mistral3Config(
        text_config=Mistral4Config(), vision_config=PixtralVisionConfig(), tie_word_embeddings=False
    )
    config.quantization_config = {**FP8, "modules_to_not_convert": NOT_CONVERTED}
    return config


def write_header_only_small_4(directory: Path, config: Any) -> int:
    """``config.json`` and a full-size safetensors file whose data is a hole (a sparse file), in the HF form:
    legacy keys, FP8 text linears with 0-d ``weight_scale_inv`` and ``activation_scale``, fused FP8 experts with
    ``[E, 1, 1]`` scales and ``[E]`` activation scales, BF16 elsewhere. Returns the tensor bytes declared."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, tensor in build_on_meta(config, torch.bfloat16).state_dict().items():
        key, shape = legacy_key(name), tuple(tensor.shape)
        if not is_quantized(name):
            specs.append(TensorSpec(key, torch.bfloat16, shape))
        elif len(shape) == 3:
            specs.append(TensorSpec(key, torch.float8_e4m3fn, shape))
            specs.append(TensorSpec(f"{key}_scale_inv", torch.float32, (shape[0], 1, 1)))
            specs.append(TensorSpec(f"{key}_activation_scale", torch.float32, (shape[0],)))
        else:
            specs.append(TensorSpec(key, torch.float8_e4m3fn, shape))
            for scale in ("weight_scale_inv", "activation_scale"):
                specs.append(TensorSpec(key.removesuffix("weight") + scale, torch.float32, ()))
    SafetensorsWriter.create(directory / "model.safetensors", FileLayout.plan(specs, {"format": "pt"})).close(
        sync=False
    )
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return sum(spec.nbytes for spec in specs)


def test_full_size_small_4_builds_on_meta_and_inspect_plans_it(tmp_path: Path, run_cli: Any) -> None:
    config = small_4_config()
    model = automodel_plugins.build_model(config)
    assert model.device.type == "meta" and model.automodel_composition.plugin == PLUGIN
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model."))
    assert 115e9 < text < 121e9  # 119B in the name; the vision tower and head aside
    declared = write_header_only_small_4(tmp_path / "small4", config)
    result = run_cli("inspect", str(tmp_path / "small4"), "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["plugin"] == PLUGIN and described["bytes_read"] == 0
    assert described["checkpoint"]["tensor_bytes"] == declared
    load = described["load"]
    layers, experts = config.text_config.num_hidden_layers, config.text_config.n_routed_experts
    assert load["adapter_details"] == {"experts": "fused"} and load["layout"] == "legacy"
    per_layer = ATTENTION_LINEARS + 3 + 2  # attention, shared experts, the two fused expert tensors
    assert load["fp8_tensors"] == load["fp8_resident_layers"] == per_layer * layers
    assert load["fp8_not_resident"] == 0 and experts == 128
