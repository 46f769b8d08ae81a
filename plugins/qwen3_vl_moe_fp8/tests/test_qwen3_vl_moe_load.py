"""Loading Qwen3-VL-MoE checkpoints in each on-disk form of the experts through the plugin.

References, never the host's own code: stock transformers' loader where it reads the form (the fused BF16
releases; per-expert FP8 with whole blocks once a per-expert conversion is registered, as transformers does for
qwen2_moe), else the reference dequantization written in ``conftest.py`` (``w.float() * expanded scale``, the
experts stacked and concatenated by hand).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from moe_checkpoints import EXPERTS, LAYERS, PLUGIN, load_stock, reference_model, stored_tensors
from transformers import Qwen3VLMoeForConditionalGeneration

import automodel_plugins
from automodel_plugins.testing.compare import assert_same_logits, assert_same_rotary, assert_same_state_dict
from automodel_plugins.testing.stock_conversions import stock_per_expert_conversion

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FP8_FORMS = {
    # name: checkpoint options
    "per-expert-16-partial-edges": {"experts": "per-expert", "block_size": (16, 16)},
    "per-expert-16-bf16-scales-3-shards": {
        "experts": "per-expert",
        "block_size": (16, 16),
        "scale_dtype": torch.bfloat16,
        "shards": 3,
    },
    "per-expert-128": {"experts": "per-expert", "block_size": (128, 128)},
    "per-expert-per-tensor": {"experts": "per-expert", "block_size": None},
    "fused-transposed-16": {"experts": "fused-transposed", "block_size": (16, 16)},
    "fused-runtime-16": {"experts": "fused-runtime", "block_size": (16, 16)},
}


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def expert_names(parameter: str) -> list[str]:
    return [f"model.language_model.layers.{i}.mlp.experts.{parameter}" for i in range(LAYERS)]


def assert_same_model(ours: Any, expected: Any, inputs: dict[str, Any]) -> None:
    assert type(ours) is Qwen3VLMoeForConditionalGeneration
    assert_same_state_dict(ours, expected)
    assert_same_rotary(ours, expected)
    assert_same_logits(ours, expected, inputs)


# --- each on-disk form ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FP8_FORMS))
def test_fp8_forms_match_the_reference_dequantization(
    name: str, moe_checkpoint: Any, image_inputs: dict[str, Any]
) -> None:
    """State dict bit for bit, rotary buffers and logits with an image, against the reference."""
    options = FP8_FORMS[name]
    path = moe_checkpoint(**options)
    ours = automodel_plugins.from_pretrained(path)
    assert_same_model(ours, reference_model(path), image_inputs)
    composition = ours.automodel_composition
    assert composition.plugin == PLUGIN and composition.adapter["experts"] == options["experts"]
    load = composition.load
    assert load.dequantized == LAYERS * (len(ATTENTION) + len(EXPERT_PARAMS))
    if options["experts"] == "per-expert":
        assert load.assembled == LAYERS * len(EXPERT_PARAMS)
        assert load.pieces == LAYERS * EXPERTS * 3  # gate + up into gate_up_proj, down into down_proj
    elif options["experts"] == "fused-transposed":
        assert load.assembled == load.pieces == LAYERS * len(EXPERT_PARAMS)
    else:
        assert load.assembled == load.pieces == 0


def test_partial_edge_blocks_are_really_there(moe_checkpoint: Any) -> None:
    """24-row gate/up pieces and 24-column down pieces in 16-blocks: a partial block on one side each."""
    stored = stored_tensors(moe_checkpoint(experts="per-expert", block_size=(16, 16)))
    prefix = "model.language_model.layers.0.mlp.experts.3"
    assert stored[f"{prefix}.gate_proj.weight"].shape == (24, 64)
    assert stored[f"{prefix}.gate_proj.weight_scale_inv"].shape == (2, 4)
    assert stored[f"{prefix}.down_proj.weight_scale_inv"].shape == (4, 2)
    fused = stored_tensors(moe_checkpoint(experts="fused-transposed", block_size=(16, 16)))
    assert fused["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 64, 48)
    assert fused["model.language_model.layers.0.mlp.experts.gate_up_proj_scale_inv"].shape == (EXPERTS, 4, 3)


@pytest.mark.parametrize("experts", ["fused-transposed", "fused-runtime"])
def test_fused_bf16_release_matches_stock(experts: str, moe_checkpoint: Any, image_inputs: Any) -> None:
    """The BF16 releases store the fused experts transposed; stock reads both orientations (its Transpose
    conversion checks the shapes)."""
    path = moe_checkpoint(experts=experts, fp8=False)
    stock = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = automodel_plugins.from_pretrained(path)
    assert_same_model(ours, stock, image_inputs)
    assert ours.automodel_composition.load.dequantized == 0
    assert ours.automodel_composition.claim_reason == "qwen3_vl_moe VLM (mixture of experts), unquantized"


@pytest.mark.parametrize("block", [(8, 8), None], ids=["whole-8x8-blocks", "per-tensor"])
def test_per_expert_fp8_matches_stock_with_a_registered_conversion(
    block: tuple[int, int] | None, moe_checkpoint: Any, image_inputs: Any
) -> None:
    """Where stock's dequant is exact (whole blocks: 24, 48 and 64 are multiples of 8; per tensor), stock with
    the per-expert conversion registered is a second, independent reference."""
    path = moe_checkpoint(experts="per-expert", block_size=block)
    with stock_per_expert_conversion():
        stock = load_stock(path)
    assert_same_model(automodel_plugins.from_pretrained(path), stock, image_inputs)


def test_stock_alone_leaves_per_expert_experts_random(moe_checkpoint: Any) -> None:
    """Why the plugin exists: transformers 5.24 has no per-expert conversion for qwen3_vl_moe, so its loader
    leaves the fused expert parameters at their random init (a load report, no error). If this starts failing,
    stock learned the form."""
    path = moe_checkpoint(experts="per-expert", block_size=(8, 8))
    stock, ours = load_stock(path).state_dict(), automodel_plugins.from_pretrained(path).state_dict()
    for name in expert_names("gate_up_proj") + expert_names("down_proj"):
        assert not torch.equal(stock[name], ours[name]), name
    attention = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stock[attention], ours[attention])


def test_meta_path_build_shard_free_to_empty_load_weights(moe_checkpoint: Any, image_inputs: Any) -> None:
    """``build_model`` -> ``to_empty`` (garbage everywhere, rotary included) -> ``load_weights`` writes every
    piece in place into the materialized experts."""
    path = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    model = automodel_plugins.build_model(path)
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, path)
    assert report.pieces == LAYERS * EXPERTS * 3
    assert_same_model(model.eval(), reference_model(path), image_inputs)


def test_fp32_load_matches_the_reference(moe_checkpoint: Any, image_inputs: Any) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    ours = automodel_plugins.from_pretrained(path, dtype=torch.float32)
    assert ours.model.language_model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert_same_state_dict(ours, reference_model(path, dtype=torch.float32))


def test_only_the_overlapping_pieces_are_read_for_a_region(moe_checkpoint: Any) -> None:
    """``read_assembled`` of experts 1..2 and the up half of gate_up_proj reads those 2 pieces and no other."""
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.readers import read_assembled

    path = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    model = automodel_plugins.build_model(path)
    adapter = automodel_plugins.get_registry().call(
        PLUGIN, "state_dict_adapter", config=model.config, checkpoint=Checkpoint.open(path)
    )
    name = expert_names("gate_up_proj")[1]
    expected = reference_model(path).state_dict()[name]
    with Checkpoint.open(path) as checkpoint:
        source = adapter.from_hf(name)
        region = (slice(1, 3), slice(24, 48), slice(0, 64))
        value, read = read_assembled(
            checkpoint,
            source,
            shape=(EXPERTS, 48, 64),
            dtype=torch.bfloat16,
            device=torch.device("cpu"),
            region=region,
        )
        assert read == 2 and torch.equal(value, expected[region])
        assert (
            checkpoint.bytes_read == 2 * 24 * 64 + 2 * 2 * 4 * 4
        )  # two FP8 pieces and their fp32 scale grids
