"""What the plan refuses in a MoE checkpoint (named by key, before any tensor data is read), what ``inspect``
says about the pieces, and FP8 residency (``dequantize=False``) of experts that cannot stay FP8 (pieces not on
block boundaries): the attention projections stay FP8, the fused experts are dequantized, with a warning that
says why (``test_qwen3_vl_moe_resident.py`` has the experts that stay FP8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from moe_checkpoints import EXPERTS, LAYERS, PLUGIN, reference_model, stored_tensors
from safetensors.torch import save_file

import automodel_plugins
from automodel_plugins.errors import (
    CheckpointError,
    MissingKeysError,
    ScaleError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.testing.compare import assert_same_logits

PIECE = "model.language_model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def damaged(moe_checkpoint: Any, tmp_path: Path, edit: Any, **options: Any) -> Path:
    """A copy of a checkpoint (one file) with its tensors edited."""
    source = moe_checkpoint(**({"experts": "per-expert", "block_size": (16, 16)} | options))
    path = Path(shutil.copytree(source, tmp_path / "damaged"))
    tensors = stored_tensors(path)
    edit(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"}
    )
    return path


def test_a_missing_piece_is_named(moe_checkpoint: Any, tmp_path: Path) -> None:
    path = damaged(moe_checkpoint, tmp_path, lambda t: (t.pop(PIECE), t.pop(PIECE + "_scale_inv")))
    with pytest.raises(
        MissingKeysError, match=r"experts\.gate_up_proj \(checkpoint key '.*experts\.3\.up_proj"
    ):
        automodel_plugins.describe_checkpoint(path)


def test_a_missing_piece_scale_is_named(moe_checkpoint: Any, tmp_path: Path) -> None:
    path = damaged(moe_checkpoint, tmp_path, lambda t: t.pop(PIECE + "_scale_inv"))
    with pytest.raises(ScaleError, match=r"experts\.3\.up_proj\.weight"):
        automodel_plugins.from_pretrained(path)


def test_a_piece_of_the_wrong_shape_is_named(moe_checkpoint: Any, tmp_path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[PIECE] = tensors[PIECE][:16].contiguous()
        tensors[PIECE + "_scale_inv"] = tensors[PIECE + "_scale_inv"][:1].contiguous()

    path = damaged(moe_checkpoint, tmp_path, edit)
    with pytest.raises(ShapeMismatchError, match=r"\(16, 64\) cannot fill the box") as caught:
        automodel_plugins.from_pretrained(path)
    assert caught.value.key == PIECE


def test_a_piece_scale_grid_of_the_wrong_shape_is_named(moe_checkpoint: Any, tmp_path: Path) -> None:
    path = damaged(moe_checkpoint, tmp_path, lambda t: t.__setitem__(PIECE + "_scale_inv", torch.ones(1, 4)))
    with pytest.raises(ScaleError, match=r"scale grid shape \(1, 4\) does not fit weight shape \(24, 64\)"):
        automodel_plugins.describe_checkpoint(path)


def test_an_expert_the_config_does_not_have_is_unexpected(moe_checkpoint: Any, tmp_path: Path) -> None:
    extra = PIECE.replace(".3.", f".{EXPERTS}.")
    path = damaged(
        moe_checkpoint,
        tmp_path,
        lambda t: t.update({extra: t[PIECE].clone(), extra + "_scale_inv": t[PIECE + "_scale_inv"].clone()}),
    )
    with pytest.raises(UnexpectedKeysError, match=f"experts\\.{EXPERTS}\\.up_proj"):
        automodel_plugins.from_pretrained(path)


def test_a_checkpoint_mixing_expert_forms_is_refused(moe_checkpoint: Any, tmp_path: Path) -> None:
    fused = stored_tensors(moe_checkpoint(experts="fused-runtime", block_size=(16, 16)))
    key = "model.language_model.layers.0.mlp.experts.down_proj"
    path = damaged(
        moe_checkpoint,
        tmp_path,
        lambda t: t.update({key: fused[key], key + "_scale_inv": fused[key + "_scale_inv"]}),
    )
    with pytest.raises(CheckpointError, match=r"mixes per-expert .* and fused"):
        automodel_plugins.from_pretrained(path)


def test_a_fused_tensor_of_neither_orientation_is_refused(moe_checkpoint: Any, tmp_path: Path) -> None:
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    path = damaged(
        moe_checkpoint,
        tmp_path,
        lambda t: t.__setitem__(key, t[key][:, :40].contiguous()),
        experts="fused-runtime",
        fp8=False,
    )
    with pytest.raises(CheckpointError, match=r"fits neither \(4, 48, 64\) nor its transpose"):
        automodel_plugins.from_pretrained(path)


def test_square_fused_tensors_are_told_apart_by_down_proj(tmp_path: Path) -> None:
    """H == 2I: ``gate_up_proj`` is [E, 64, 64] in both orientations; ``down_proj`` [E, 32, 64] vs [E, 64, 32]
    decides, so the transposed release loads right where stock would load it transposed (silently)."""
    from moe_checkpoints import write_moe_checkpoint
    from transformers import Qwen3VLMoeForConditionalGeneration

    from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(tiny_qwen3_vl_moe_config(moe_intermediate_size=32)).eval()
    path = write_moe_checkpoint(model, tmp_path / "square", experts="fused-transposed", fp8=False)
    ours = automodel_plugins.from_pretrained(path)
    assert ours.automodel_composition.adapter["experts"] == "fused-transposed"
    expected = model.model.language_model.layers[0].mlp.experts.gate_up_proj.detach().to(torch.bfloat16)
    assert torch.equal(ours.model.language_model.layers[0].mlp.experts.gate_up_proj, expected)
    stock = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    assert not torch.equal(stock.model.language_model.layers[0].mlp.experts.gate_up_proj, expected)


# --- inspect ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experts", "pieces"),
    [("per-expert", LAYERS * EXPERTS * 3), ("fused-transposed", LAYERS * 2), ("fused-runtime", 0)],
)
def test_inspect_counts_the_pieces_without_reading_data(
    experts: str, pieces: int, moe_checkpoint: Any
) -> None:
    """16x16 blocks: the per-expert up pieces start at row 24 of gate_up_proj, inside a block, and the fused
    transposed form would need its grids transposed, so only fused-runtime experts can stay FP8."""
    path = moe_checkpoint(experts=experts, block_size=(16, 16))
    described = describe_checkpoint(path)
    assert described["bytes_read"] == 0 and described["plugin"] == PLUGIN
    load = described["load"]
    assert load["adapter_details"] == {"experts": experts}
    assert load["assembled_tensors"] == (LAYERS * 2 if pieces else 0) and load["pieces"] == pieces
    stored = stored_tensors(path)
    assert load["scale_keys"] == sum(key.endswith("scale_inv") for key in stored)
    assert load["fp8_tensors"] == LAYERS * (4 + 2)
    resident_experts = experts == "fused-runtime"
    assert load["fp8_resident_layers"] == LAYERS * (6 if resident_experts else 4)
    assert load["fp8_not_resident"] == (0 if resident_experts else LAYERS * 2)


# --- FP8 residency ----------------------------------------------------------------------------------------


def test_fp8_resident_load_keeps_attention_fp8_and_dequantizes_the_experts(
    moe_checkpoint: Any, image_inputs: Any
) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    with pytest.warns(
        UserWarning, match=r"4 FP8 tensor\(s\) cannot stay FP8 .* not on a 16x16 block boundary"
    ):
        model = automodel_plugins.from_pretrained(path, dequantize=False)
    composition = model.automodel_composition
    attention = model.model.language_model.layers[0].self_attn
    assert all(isinstance(getattr(attention, p), Fp8Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert len(composition.fp8_resident) == LAYERS * 4
    assert sorted(composition.fp8_not_resident) == sorted(
        f"model.language_model.layers.{i}.mlp.experts.{p}"
        for i in range(LAYERS)
        for p in ("gate_up_proj", "down_proj")
    )
    experts = model.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert_same_logits(model, reference_model(path), image_inputs)


def test_quantization_config_of_a_moe_checkpoint_lists_the_routers(moe_checkpoint: Any) -> None:
    config = json.loads((moe_checkpoint(experts="per-expert") / "config.json").read_text())
    not_converted = config["quantization_config"]["modules_to_not_convert"]
    assert {f"model.language_model.layers.{i}.mlp.gate" for i in range(LAYERS)} <= set(not_converted)
