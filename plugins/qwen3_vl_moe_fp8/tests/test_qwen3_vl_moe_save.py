"""Saving a loaded Qwen3-VL-MoE: ``"source"`` runs the many-to-one adapter backwards (each fused expert
parameter split into its pieces, each FP8 piece written with its own scale under its own key), so a load then
save round-trips every on-disk form byte for byte; ``"none"`` is what stock ``save_pretrained`` writes (fused,
as held) and stock reads it; after training only the pieces whose values outgrew their scale get fresh ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from moe_checkpoints import EXPERTS, PLUGIN, reference_model, reference_state_dict, same_bytes, stored_tensors
from transformers import Qwen3VLMoeForConditionalGeneration

import automodel_plugins
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict

ROUND_TRIPS = {
    "per-expert-16": {"experts": "per-expert", "block_size": (16, 16)},
    "per-expert-16-bf16-scales-3-shards": {
        "experts": "per-expert",
        "block_size": (16, 16),
        "scale_dtype": torch.bfloat16,
        "shards": 3,
    },
    "per-expert-per-tensor": {"experts": "per-expert", "block_size": None},
    "fused-transposed-fp8": {"experts": "fused-transposed", "block_size": (16, 16)},
    "fused-runtime-fp8": {"experts": "fused-runtime", "block_size": (16, 16)},
    "fused-transposed-bf16": {"experts": "fused-transposed", "fp8": False},
    "per-expert-bf16": {"experts": "per-expert", "fp8": False},
}


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_source_round_trip_is_byte_identical(name: str, moe_checkpoint: Any, tmp_path: Path) -> None:
    options = ROUND_TRIPS[name]
    source = moe_checkpoint(**options)
    model = automodel_plugins.from_pretrained(source)
    report = automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert same_bytes(stored_tensors(tmp_path / "out"), stored_tensors(source)) == []
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written.get("quantization_config") == json.loads((source / "config.json").read_text()).get(
        "quantization_config"
    )
    fp8 = options.get("fp8", True)
    attention = 2 * 4
    experts = {"per-expert": 2 * 3 * EXPERTS}.get(options["experts"], 2 * 2)
    assert report.quantized == report.scales_kept == ((attention + experts) if fp8 else 0)
    if options.get("shards", 1) == 1:  # one file each: header and data are the source's
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
            source / "model.safetensors"
        ).read_bytes()


def test_a_trained_expert_gets_fresh_scales_only_in_its_own_pieces(
    moe_checkpoint: Any, tmp_path: Path
) -> None:
    """Expert 2 of layer 1 grown 3x past its scales: its gate, up and down pieces get fresh scales, every
    other piece keeps its source bytes; the saved checkpoint reads back (reference dequant) as the trained
    weights within one FP8 step."""
    source = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    model = automodel_plugins.from_pretrained(source)
    experts = model.model.language_model.layers[1].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[2].mul_(3.0)
        experts.down_proj[2].mul_(3.0)
    report = automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert report.scales_fresh == 3 and report.scales_kept == report.quantized - 3
    saved, original = stored_tensors(tmp_path / "out"), stored_tensors(source)
    grown = {
        f"model.language_model.layers.1.mlp.experts.2.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    changed = set(same_bytes(saved, original))
    assert changed <= grown | {key + "_scale_inv" for key in grown}
    assert {key.removesuffix("_scale_inv") for key in changed} == grown
    back = reference_state_dict(tmp_path / "out")
    for name in ("gate_up_proj", "down_proj"):
        full = f"model.language_model.layers.1.mlp.experts.{name}"
        trained = getattr(experts, name).detach().float()
        torch.testing.assert_close(back[full].float(), trained, atol=0, rtol=2**-3)


def test_none_writes_what_stock_save_pretrained_writes_and_stock_reads_it(
    moe_checkpoint: Any, tmp_path: Path, image_inputs: Any
) -> None:
    """Fused expert parameters as the module holds them ([E, 2I, H], [E, H, I]): transformers 5.24's own
    ``save_pretrained`` writes that layout, and its loader reads it (its Transpose conversion sees the shapes
    already fit)."""
    model = automodel_plugins.from_pretrained(moe_checkpoint(experts="per-expert", block_size=(16, 16)))
    automodel_plugins.save_pretrained(model, tmp_path / "ours", quantization="none")
    model.save_pretrained(tmp_path / "stock")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (
        tmp_path / "stock" / "model.safetensors"
    ).read_bytes()
    stored = stored_tensors(tmp_path / "ours")
    assert stored["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 48, 64)
    stock = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16).eval()
    assert_same_state_dict(stock, model)
    assert_same_logits(stock, model, image_inputs)
    again = automodel_plugins.from_pretrained(tmp_path / "ours")
    assert again.automodel_composition.adapter["experts"] == "fused-runtime"
    assert_same_state_dict(again, model)


def test_fp8_block_format_quantizes_the_linears_and_keeps_the_experts_bf16(
    moe_checkpoint: Any, tmp_path: Path
) -> None:
    """transformers' FP8 format quantizes ``nn.Linear`` weights only: the fused experts are written in the
    model's dtype; stock reads the result (with whole 16-blocks: exactly)."""
    source = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    model = automodel_plugins.from_pretrained(source)
    report = automodel_plugins.save_pretrained(
        model, tmp_path / "out", quantization="fp8-block", block_size=16
    )
    stored = stored_tensors(tmp_path / "out")
    assert stored["model.language_model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert stored["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert report.scales_kept == 2 * 4  # the attention projections keep the source's 16x16 scales
    back = automodel_plugins.from_pretrained(tmp_path / "out")
    assert_same_state_dict(back, reference_model(tmp_path / "out"))
    torch.testing.assert_close(
        back.model.language_model.layers[0].mlp.experts.down_proj,
        model.model.language_model.layers[0].mlp.experts.down_proj,
        atol=0,
        rtol=0,
    )
