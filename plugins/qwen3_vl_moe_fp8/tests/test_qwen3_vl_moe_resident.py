"""FP8-resident experts (``dequantize=False``): where every expert piece starts on a block boundary (8x8 blocks:
24, 48 and 64 are multiples of 8), a MoE layer's experts become an ``Fp8Experts`` holding the checkpoint's FP8
bytes and grids, and the model computes exactly what the stock class holding the hand-dequantized weights
computes with its eager experts loop (the losses and LoRA gradients too; both models set to ``eager``: the
default, ``grouped_mm``, is compared in ``test_qwen3_vl_moe_grouped.py``); ``inspect`` agrees with the load."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from moe_checkpoints import (
    EXPERTS,
    GRID_THW,
    LAYERS,
    NOT_CONVERTED,
    PLUGIN,
    QWEN_FP8,
    SEQ,
    load_stock,
    reference_model,
    reference_state_dict,
    same_bytes,
    stored_tensors,
    tiny_config,
)

import automodel_plugins
from automodel_plugins.errors import DtypeMismatchError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.pipeline.load.describe import describe_checkpoint
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_logits
from automodel_plugins.testing.residency import held_bytes, watch_weight_copies
from automodel_plugins.testing.stock_conversions import stock_per_expert_conversion
from automodel_plugins.testing.tiny_models import qwen3_vl_image_batch

ALIGNED = (8, 8)
FORMS = ["per-expert", "fused-runtime"]
F32, BF16 = torch.float32, torch.bfloat16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def load_resident(path: Path, dtype: torch.dtype = BF16) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = automodel_plugins.from_pretrained(path, dtype=dtype, dequantize=False)
    assert not [w for w in caught if "cannot stay FP8" in str(w.message)]
    return model


def eager(model: Any) -> Any:
    """The stock experts loop (the default, grouped_mm, sums in another order)."""
    model.set_experts_implementation("eager")
    return model


def experts_of(model: Any, layer: int) -> Any:
    return model.get_submodule(f"model.language_model.layers.{layer}.mlp.experts")


def stored_experts(path: Path, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(codes as uint8, fp32 grids)`` of one layer's fused tensors, put together by hand from the file."""
    stored = stored_tensors(path)
    prefix = f"model.language_model.layers.{layer}.mlp.experts"
    if f"{prefix}.gate_up_proj" in stored:
        return {
            p: (stored[f"{prefix}.{p}"].view(torch.uint8), stored[f"{prefix}.{p}_scale_inv"].float())
            for p in ("gate_up_proj", "down_proj")
        }

    def expert(e: int, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{prefix}.{e}.{projection}.weight"
        return stored[key].view(torch.uint8), stored[key.removesuffix("weight") + "weight_scale_inv"].float()

    out = {}
    for fused, projections in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        pairs = [[expert(e, p) for p in projections] for e in range(EXPERTS)]
        out[fused] = (
            torch.stack([torch.cat([c for c, _ in row]) for row in pairs]),
            torch.stack([torch.cat([s for _, s in row]) for row in pairs]),
        )
    return out


def with_lora(model: Any) -> Any:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def one_sequence() -> dict[str, torch.Tensor]:
    """One sequence of 12 tokens: no activation ([n <= 12, *]) shares an expert matrix's shape."""
    return qwen3_vl_image_batch(tiny_config(), batch=1, seq=SEQ, grid_thw=GRID_THW)


@pytest.mark.parametrize("form", FORMS)
def test_aligned_experts_hold_the_checkpoint_bytes_and_grids(form: str, moe_checkpoint: Any) -> None:
    path = moe_checkpoint(experts=form, block_size=ALIGNED)
    model = load_resident(path)
    composition = model.automodel_composition
    names = [f"model.language_model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    assert all(type(experts_of(model, i)) is Fp8Experts for i in range(LAYERS))
    assert set(names) <= set(composition.fp8_resident) and len(composition.fp8_resident) == LAYERS * 5
    assert composition.fp8_not_resident == [] and composition.load.kept_fp8 == LAYERS * 6
    reference = reference_state_dict(path)
    for layer in range(LAYERS):
        experts = experts_of(model, layer)
        for name, (codes, grids) in stored_experts(path, layer).items():
            assert torch.equal(experts.codes(name).view(torch.uint8), codes), (layer, name)
            assert torch.equal(experts.scale(name), grids), (layer, name)
            want = reference[f"model.language_model.layers.{layer}.mlp.experts.{name}"]
            assert torch.equal(experts.dequantized(name), want), (layer, name)
    state = model.state_dict()
    assert state["model.language_model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert model.config.quantization_config["quant_method"] == "fp8"


@pytest.mark.parametrize("form", FORMS)
def test_inspect_agrees_with_the_load(form: str, moe_checkpoint: Any) -> None:
    path = moe_checkpoint(experts=form, block_size=ALIGNED)
    load = describe_checkpoint(path)["load"]
    assert load["fp8_resident_layers"] == LAYERS * 6 and load["fp8_not_resident"] == 0
    model = load_resident(path)
    assert load["bytes_after_load_fp8_resident"] == held_bytes(model)
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert len(experts) == LAYERS and all(type(m) is Fp8Experts for m in experts)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("form", FORMS)
def test_logits_equal_the_stock_class_holding_the_reference_dequantization(
    form: str, dtype: torch.dtype, moe_checkpoint: Any, image_inputs: Any
) -> None:
    path = moe_checkpoint(experts=form, block_size=ALIGNED)
    assert_same_logits(eager(load_resident(path, dtype)), eager(reference_model(path, dtype)), image_inputs)


def test_logits_equal_stock_transformers_reading_the_per_expert_form(
    moe_checkpoint: Any, image_inputs: Any
) -> None:
    """A second, independent reference: stock transformers with the per-expert conversion registered (whole
    8x8 blocks, where its dequantization is exact), run with the same eager experts loop."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    with stock_per_expert_conversion():
        stock = load_stock(path)
    assert_same_logits(eager(load_resident(path)), eager(stock), image_inputs)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("form", FORMS)
def test_loss_and_lora_gradients_are_bit_identical_to_the_dequantized_model(
    form: str, dtype: torch.dtype, moe_checkpoint: Any, image_batch: Any
) -> None:
    path = moe_checkpoint(experts=form, block_size=ALIGNED)
    resident = with_lora(eager(load_resident(path, dtype)))
    dequantized = with_lora(eager(automodel_plugins.from_pretrained(path, dtype=dtype)))
    results = []
    for model in (resident, dequantized):
        loss = model(**image_batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (loss, grads), (want_loss, want_grads) = results
    assert torch.equal(loss, want_loss)
    assert sorted(grads) == sorted(want_grads) and len(grads) == LAYERS * 4 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name
    # and close to the stock class's default (grouped_mm) experts: the same weights, summed in another order
    stock = with_lora(reference_model(path, dtype))
    torch.testing.assert_close(stock(**image_batch).loss, loss, atol=1e-2 if dtype == BF16 else 1e-5, rtol=0)


def test_no_dequantized_expert_stays_alive_or_is_saved_for_backward(moe_checkpoint: Any) -> None:
    model = with_lora(eager(load_resident(moe_checkpoint(experts="per-expert", block_size=ALIGNED), F32)))
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    with watch_weight_copies(model, experts) as watch:
        model(**one_sequence()).loss.backward()
    assert watch.created > 0 and watch.layer_calls == LAYERS
    # matrices this small take the CPU dequant's plain path (fp32 temporaries of one matrix's shape), so the
    # peak counts those; tests/test_fp8_experts.py shows one copy at a time on the table-lookup path
    assert watch.alive_after_layers == [0] * LAYERS and watch.peak_alive <= 3
    assert watch.saved_copies == []
    assert all(m.gate_up_proj.grad is None for m in experts)


def test_bf16_experts_beside_fp8_attention_stay_stock_without_a_warning(
    moe_model: Any, tmp_path: Path
) -> None:
    path = write_fp8_checkpoint(
        moe_model,
        tmp_path / "bf16-experts",
        block_size=ALIGNED,
        modules_to_not_convert=NOT_CONVERTED,
        experts="per-expert",
        fp8_experts=False,
        **QWEN_FP8,
    )
    model = load_resident(path)
    assert type(experts_of(model, 0)).__name__ == "Qwen3VLMoeTextExperts"
    assert model.automodel_composition.fp8_not_resident == []
    assert experts_of(model, 0).gate_up_proj.dtype == BF16


def test_meta_build_to_empty_load_weights_fills_the_resident_experts(
    moe_checkpoint: Any, image_inputs: Any
) -> None:
    """The path a sharded load takes: the codes are written in place into the materialized experts."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    model = automodel_plugins.build_model(path, dequantize=False)
    assert type(experts_of(model, 1)) is Fp8Experts and experts_of(model, 1).gate_up_proj.is_meta
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, path)
    assert report.kept_fp8 == LAYERS * 6 and report.pieces == LAYERS * EXPERTS * 3
    assert_same_logits(model.eval(), load_resident(path), image_inputs)


def test_a_resident_model_refuses_experts_that_cannot_stay_fp8(moe_checkpoint: Any) -> None:
    model = automodel_plugins.build_model(
        moe_checkpoint(experts="per-expert", block_size=ALIGNED), dequantize=False
    )
    model.to_empty(device="cpu")
    misaligned = moe_checkpoint(experts="per-expert", block_size=(16, 16))
    with pytest.raises(DtypeMismatchError, match="not on a 16x16 block boundary"):
        automodel_plugins.load_weights(model, misaligned)


# --- saving ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"experts": "per-expert", "block_size": ALIGNED},
        {"experts": "fused-runtime", "block_size": ALIGNED},
        {"experts": "fused-runtime", "block_size": (16, 16)},  # partial edge blocks inside each expert's grid
    ],
    ids=["per-expert", "fused-runtime", "fused-runtime-16"],
)
def test_source_save_gives_back_the_source_bytes(options: dict, moe_checkpoint: Any, tmp_path: Path) -> None:
    source = moe_checkpoint(**options)
    model = load_resident(source)
    assert type(experts_of(model, 0)) is Fp8Experts
    automodel_plugins.save_pretrained(model, tmp_path / "out")
    assert same_bytes(stored_tensors(tmp_path / "out"), stored_tensors(source)) == []
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()


def test_none_save_is_the_dequantized_model_and_stock_reads_it(
    moe_checkpoint: Any, tmp_path: Path, image_inputs: Any
) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    resident = load_resident(path)
    automodel_plugins.save_pretrained(resident, tmp_path / "resident", quantization="none")
    automodel_plugins.save_pretrained(
        automodel_plugins.from_pretrained(path), tmp_path / "dequantized", quantization="none"
    )
    assert (tmp_path / "resident" / "model.safetensors").read_bytes() == (
        tmp_path / "dequantized" / "model.safetensors"
    ).read_bytes()
    from transformers import Qwen3VLMoeForConditionalGeneration

    stock = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "resident", dtype=BF16).eval()
    assert_same_logits(resident, eager(stock), image_inputs)


def test_stock_save_pretrained_writes_the_fused_fp8_layout_that_loads_back(
    moe_checkpoint: Any, tmp_path: Path, image_inputs: Any
) -> None:
    """transformers' own ``save_pretrained`` writes what the module holds: the fused FP8 codes with one grid per
    expert (its ``FP8Experts`` layout, our fused-runtime form), which loads back FP8-resident as it was."""
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    resident = load_resident(path)
    resident.save_pretrained(tmp_path / "stock")
    stored = stored_tensors(tmp_path / "stock")
    prefix = "model.language_model.layers.0.mlp.experts"
    assert stored[f"{prefix}.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert stored[f"{prefix}.gate_up_proj_scale_inv"].shape == (EXPERTS, 6, 8)
    again = load_resident(tmp_path / "stock")
    assert again.automodel_composition.adapter["experts"] == "fused-runtime"
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(
            experts_of(again, 0).codes(name).view(torch.uint8),
            experts_of(resident, 0).codes(name).view(torch.uint8),
        )
    assert_same_logits(again, resident, image_inputs)


def test_merged_attention_lora_keeps_the_experts_fp8_and_a_stock_save_loads_back(
    moe_checkpoint: Any, tmp_path: Path, image_inputs: Any
) -> None:
    """``merge_lora`` turns the attention into BF16 ``nn.Linear``s; the experts stay FP8, so the config keeps its
    quantization (the merged layers in ``modules_to_not_convert``) and a stock save loads back as it was."""
    model = with_lora(load_resident(moe_checkpoint(experts="per-expert", block_size=ALIGNED)))
    merged = automodel_plugins.merge_lora(model)
    assert type(experts_of(merged, 0)) is Fp8Experts
    quantization = merged.config.quantization_config
    assert quantization["quant_method"] == "fp8"
    assert "model.language_model.layers.0.self_attn.q_proj" in quantization["modules_to_not_convert"]
    merged.save_pretrained(tmp_path / "merged")
    again = load_resident(tmp_path / "merged")
    assert type(experts_of(again, 1)) is Fp8Experts
    assert type(again.get_submodule("model.language_model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert_same_logits(again, merged, image_inputs)


def test_gradient_checkpointing_gives_the_same_lora_gradients(moe_checkpoint: Any, image_batch: Any) -> None:
    path = moe_checkpoint(experts="per-expert", block_size=ALIGNED)
    results = []
    for checkpointing in (False, True):
        model = load_resident(path, F32)
        if checkpointing:
            model.activation_checkpointing_enable()
        model = with_lora(model).train()
        assert model.base_model.model.model.language_model.gradient_checkpointing == checkpointing
        model(**image_batch).loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = results
    assert sorted(plain) == sorted(checkpointed) and plain
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name
