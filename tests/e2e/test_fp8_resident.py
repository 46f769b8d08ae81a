"""``from_pretrained(path, dequantize=False)`` on the tiny Mistral3 VLM: FP8-resident linears, LoRA on them, PEFT
save / reload / merge, memory, and the bad inputs.

References, independent of the resident code path: the same checkpoint loaded dequantized (``dequantize=True``,
itself checked against stock transformers by ``test_load_formats``) with the same LoRA; the checkpoint's own
bytes read with safetensors; the FP8 dequantization written out in ``automodel_plugins.testing.compare``; stock
transformers reading what a stock ``save_pretrained`` wrote. Batches hold an image, so the vision tower and the
projector (BF16, not FP8) take part in every loss and gradient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import (
    LEGACY_PREFIXES,
    ODD,
    Checkpoints,
    CheckpointSpec,
    checkpoint_tensors,
    tiny_config,
)
from safetensors import safe_open
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins import from_pretrained
from automodel_plugins.errors import DtypeMismatchError, FrozenFp8WeightError, NotQuantizedError
from automodel_plugins.fp8 import encode_scale
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.fp8_resident import Fp8Codes
from automodel_plugins.registry import Registry
from automodel_plugins.testing.compare import reference_dequantized_state_dict
from automodel_plugins.testing.residency import held_bytes, watch_weight_copies
from automodel_plugins.testing.tiny_models import mistral3_image_batch

peft = pytest.importorskip("peft")

FP8_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [*FP8_TARGETS, "linear_1"]  # and the (BF16) projector, which the image reaches
SPECS = {
    "per-tensor": CheckpointSpec(model=ODD),
    "block": CheckpointSpec(model=ODD, block_size=(32, 32)),  # 72 and 136: partial edge blocks on both axes
}
F32, BF16 = torch.float32, torch.bfloat16
ADAPTER_TENSORS = 2 * (2 * 7 + 7 + 1)
"""A and B of every target: 2 text layers x 7 (FP8), the vision tower's layer x 7 (BF16), the projector."""


def runtime_name(key: str) -> str:
    for runtime, legacy in LEGACY_PREFIXES:
        if key.startswith(legacy):
            return runtime + key[len(legacy) :]
    return key


def batch(dtype: torch.dtype = F32) -> dict[str, torch.Tensor]:
    """Two rows of 15 tokens (an odd count: no activation shares a weight's shape), one 32x48 image."""
    return mistral3_image_batch(tiny_config(ODD), batch=2, seq=15, image_rows=1, dtype=dtype)


def with_lora(model: Any, *, register: bool = False) -> Any:
    """The same random (non-zero) LoRA for the same model shape."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    if register:
        automodel_plugins.register_fp8_lora(config)
    return peft.get_peft_model(model, config)


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=sorted(SPECS))
def path(request: pytest.FixtureRequest, checkpoints: Checkpoints) -> Path:
    return checkpoints(SPECS[request.param])


def load(path: Path, registry: Registry, *, dtype: torch.dtype = F32, dequantize: bool = True) -> Any:
    return from_pretrained(path, dtype=dtype, dequantize=dequantize, skip_logits=True, registry=registry)


# --- what is resident -------------------------------------------------------------------------------------


def test_exactly_the_checkpoint_fp8_linears_become_resident(path: Path, registry: Registry) -> None:
    model = load(path, registry, dequantize=False)
    assert type(model) is Mistral3ForConditionalGeneration
    fp8_keys = [k for k, t in checkpoint_tensors(path).items() if t.dtype == torch.float8_e4m3fn]
    expected = sorted(runtime_name(k).removesuffix(".weight") for k in fp8_keys)
    resident = sorted(name for name, m in model.named_modules() if isinstance(m, Fp8Linear))
    assert resident == expected == sorted(model.automodel_composition.fp8_resident)
    assert len(resident) == 14 and model.automodel_composition.load.kept_fp8 == 14
    for name in (
        "model.multi_modal_projector.linear_1",
        "lm_head",
        "model.vision_tower.transformer.layers.0.feed_forward.gate_proj",
    ):
        assert type(model.get_submodule(name)) is torch.nn.Linear, name  # modules_to_not_convert stay F32
    assert model.config.quantization_config["quant_method"] == "fp8"  # it still holds FP8 weights


def test_codes_are_the_checkpoint_bytes_and_the_dequant_matches_the_reference(
    path: Path, registry: Registry
) -> None:
    model = load(path, registry, dequantize=False)
    stored = checkpoint_tensors(path)
    reference = reference_dequantized_state_dict(path, dtype=F32, rename=runtime_name)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8Linear):
            key = next(k for k in stored if runtime_name(k) == f"{name}.weight")
            assert torch.equal(layer.codes.view(torch.uint8), stored[key].view(torch.uint8)), name
            assert torch.equal(layer.dequantized_weight(), reference[f"{name}.weight"]), name


@pytest.mark.parametrize("scale_dtype", [F32, BF16, torch.uint8])
def test_scales_encode_back_to_the_stored_bytes(
    checkpoints: Checkpoints, registry: Registry, scale_dtype: torch.dtype
) -> None:
    """What a saver needs to write an untouched layer back byte-identically: ``codes`` and the scale re-encoded
    in ``scale_dtype`` (the checkpoint's; E8M0 bytes included) to the stored shape."""
    path = checkpoints(SPECS["block"], scale_dtype=scale_dtype)
    model = load(path, registry, dequantize=False)
    stored = checkpoint_tensors(path)
    for name, layer in model.named_modules():
        if isinstance(layer, Fp8Linear):
            key = next(k for k in stored if runtime_name(k) == f"{name}.weight").removesuffix("weight")
            scale = stored[key + "weight_scale_inv"]
            again = encode_scale(layer.weight_scale_inv, layer.scale_dtype).reshape(scale.shape)
            assert layer.scale_dtype == scale_dtype and again.dtype == scale.dtype, name
            assert torch.equal(again.view(torch.uint8), scale.view(torch.uint8)), name


def test_resident_bytes_are_fp8_codes_plus_scales_plus_the_rest_and_inspect_says_so(
    path: Path, registry: Registry
) -> None:
    resident, dequantized = load(path, registry, dequantize=False), load(path, registry)
    stored = checkpoint_tensors(path)
    expected = 0
    for key, tensor in stored.items():
        if key.endswith(("weight_scale_inv", "activation_scale")):
            expected += tensor.numel() * 4  # kept in fp32 (the static activation scale too)
        elif tensor.dtype == torch.float8_e4m3fn:
            expected += tensor.numel()  # one byte a parameter
        else:
            expected += tensor.numel() * 4  # F32 load
    assert held_bytes(resident) == expected
    description = automodel_plugins.describe_checkpoint(path, dtype=F32, registry=registry)["load"]
    assert description["bytes_after_load_fp8_resident"] == held_bytes(resident)
    assert description["bytes_after_load"] == held_bytes(dequantized)
    assert description["fp8_resident_layers"] == 14
    assert held_bytes(resident) < 0.7 * held_bytes(dequantized)


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_loss_and_every_lora_gradient_equal_the_dequantized_model(
    path: Path, registry: Registry, dtype: torch.dtype
) -> None:
    """Bit for bit (the 1e-6 / bf16 tolerances of docs/fp8-resident.md are not even needed): the dequantized
    weight is the same fp32 product rounded once, and every matmul is the same call."""
    reference = with_lora(load(path, registry, dtype=dtype)).train()
    resident = with_lora(load(path, registry, dtype=dtype, dequantize=False)).train()
    lora_a = resident.base_model.model.model.language_model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.dtype == F32  # PEFT's adapter dtype for the compute dtype, not FP8-rounded
    expected, got = reference(**batch(dtype)), resident(**batch(dtype))
    assert got.logits is None  # the plugin's fused loss
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    expected.loss.backward()
    got.loss.backward()
    expected_grads, got_grads = lora_grads(reference), lora_grads(resident)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) == ADAPTER_TENSORS
    assert all("lora_" in name for name in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0, msg=name)
    for model in (reference, resident):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        optimizer.step()
    with torch.no_grad():
        after, after_reference = resident(**batch(dtype)).loss, reference(**batch(dtype)).loss
    assert after != got.loss and torch.equal(after, after_reference)


def test_gradient_checkpointing_gives_the_same_gradients(path: Path, registry: Registry) -> None:
    reference = load(path, registry)
    resident = load(path, registry, dequantize=False)
    for model in (reference, resident):
        model.activation_checkpointing_enable()
    reference, resident = with_lora(reference).train(), with_lora(resident).train()
    expected, got = reference(**batch()).loss, resident(**batch()).loss
    expected.backward()
    got.backward()
    assert torch.equal(got, expected)
    for name, grad in lora_grads(reference).items():
        assert torch.equal(lora_grads(resident)[name], grad), name


def test_no_dequantized_weight_outlives_its_layer_or_is_saved_for_backward(
    path: Path, registry: Registry
) -> None:
    model = with_lora(load(path, registry, dequantize=False)).train()
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    with watch_weight_copies(model) as watch:
        loss = model(**batch()).loss
        after_forward = watch.alive()
        loss.backward()
    assert watch.layer_calls == len(layers) == 14
    # each layer's copy (and the dequant's own fp32 temporaries) died before the next layer ran
    assert watch.alive_after_layers == [0] * 14 and after_forward == 0 and watch.alive() == 0
    assert watch.saved_copies == [] and watch.created > 0  # the watch did see the dequantized weights


def test_model_to_bfloat16_keeps_the_codes_and_equals_the_dequantized_model_cast(
    path: Path, registry: Registry
) -> None:
    resident, reference = load(path, registry, dequantize=False), load(path, registry)
    q_proj = resident.model.language_model.layers[1].self_attn.q_proj
    codes = q_proj.codes.view(torch.uint8).clone()
    resident.to(BF16)
    reference.to(BF16)
    assert q_proj.weight.dtype == torch.uint8 and torch.equal(q_proj.codes.view(torch.uint8), codes)
    assert q_proj.weight_scale_inv.dtype == F32 and q_proj.compute_dtype == BF16
    with torch.no_grad():
        assert torch.equal(resident(**batch(BF16)).loss, reference(**batch(BF16)).loss)


# --- PEFT: save, reload, merge ----------------------------------------------------------------------------


def _trained(path: Path, registry: Registry, *, register: bool = False) -> Any:
    model = with_lora(load(path, registry, dequantize=False), register=register).train()
    model(**batch()).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return model.eval()


def test_saved_adapter_reloads_onto_a_fresh_resident_model_with_the_same_loss(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    trained = _trained(path, registry)
    with torch.no_grad():
        expected = trained(**batch()).loss
    trained.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == ADAPTER_TENSORS and all("lora_" in key for key in keys)  # no FP8 code or scale saved
    fresh = load(path, registry, dequantize=False)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    config = automodel_plugins.register_fp8_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    registered = peft.PeftModel.from_pretrained(
        load(path, registry, dequantize=False), tmp_path / "adapter", config=config
    )
    q_proj = registered.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj) is automodel_plugins.Fp8LoraLinear
    with torch.no_grad():
        assert torch.equal(reloaded(**batch()).loss, expected)
        assert torch.equal(registered(**batch()).loss, expected)


def test_merge_lora_is_the_dequantized_weight_plus_the_lora_delta(path: Path, registry: Registry) -> None:
    trained = _trained(path, registry)
    reference = reference_dequantized_state_dict(path, dtype=F32, rename=runtime_name)
    layer = trained.base_model.model.model.language_model.layers[1].mlp.down_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    delta = (b @ a) * layer.scaling["default"]
    with torch.no_grad():
        expected_loss = trained(**batch()).loss
    merged = automodel_plugins.merge_lora(trained)
    assert type(merged) is Mistral3ForConditionalGeneration
    assert not any(isinstance(m, Fp8Linear) for m in merged.modules())
    down = merged.model.language_model.layers[1].mlp.down_proj
    assert type(down) is torch.nn.Linear and down.weight.dtype == F32
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(down.weight, reference[name] + delta, rtol=0, atol=1e-6)
    assert not hasattr(merged.config, "quantization_config")  # every FP8 layer was merged: nothing FP8 left
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch()).loss, expected_loss, rtol=0, atol=1e-5)


def test_merging_some_layers_keeps_the_others_fp8_and_stock_transformers_reads_the_save(
    checkpoints: Checkpoints, registry: Registry, tmp_path: Path
) -> None:
    """Per-tensor scales (stock transformers misreads partial edge blocks, see testing.compare)."""
    path = checkpoints(SPECS["per-tensor"])
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(load(path, registry, dequantize=False), config)
    merged = automodel_plugins.merge_lora(model)
    assert len([m for m in merged.modules() if isinstance(m, Fp8Linear)]) == 12
    skipped = merged.config.quantization_config["modules_to_not_convert"]
    assert "model.language_model.layers.0.self_attn.q_proj" in skipped
    merged.save_pretrained(tmp_path / "merged")
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=F32).eval()
    del merged.forward  # compare logits of the stock forward
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, merged(**inputs).logits)


def test_stock_save_pretrained_of_a_resident_model_is_an_fp8_checkpoint_stock_transformers_reads(
    checkpoints: Checkpoints, registry: Registry, tmp_path: Path
) -> None:
    path = checkpoints(SPECS["per-tensor"])
    resident, reference = load(path, registry, dequantize=False), load(path, registry)
    resident.save_pretrained(tmp_path / "saved")
    saved = {runtime_name(key): tensor for key, tensor in checkpoint_tensors(tmp_path / "saved").items()}
    assert saved["model.language_model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert saved["model.language_model.layers.0.mlp.up_proj.weight_scale_inv"].dtype == F32
    assert (
        json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "fp8"
    )
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=F32).eval()
    del reference.forward
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, reference(**inputs).logits)


def test_registered_fp8_lora_merges_and_unmerges_in_place_exactly(path: Path, registry: Registry) -> None:
    trained = _trained(path, registry, register=True)
    q_proj = trained.base_model.model.model.language_model.layers[0].self_attn.q_proj
    base = q_proj.base_layer
    codes = base.codes.view(torch.uint8).clone()
    with torch.no_grad():
        before = trained(**batch()).loss
        trained.merge_adapter()
        assert type(q_proj.base_layer) is torch.nn.Linear
        merged = trained(**batch()).loss
        trained.unmerge_adapter()
        after = trained(**batch()).loss
    assert q_proj.base_layer is base and torch.equal(base.codes.view(torch.uint8), codes)
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    assert torch.equal(after, before)
    unloaded = trained.merge_and_unload()  # PEFT's own, through Fp8LoraLinear
    assert type(unloaded.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch()).loss, before, rtol=0, atol=1e-5)


# --- build_model + load_weights ---------------------------------------------------------------------------


def test_build_model_and_load_weights_give_the_same_resident_model(path: Path, registry: Registry) -> None:
    expected = load(path, registry, dequantize=False)
    model = automodel_plugins.build_model(path, dtype=F32, dequantize=False, registry=registry)
    assert model.automodel_composition.fp8_resident == expected.automodel_composition.fp8_resident
    layer = model.model.language_model.layers[0].mlp.down_proj
    assert isinstance(layer, Fp8Linear) and layer.weight.is_meta and layer.weight.dtype == torch.uint8
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, path, registry=registry)
    assert report.kept_fp8 == 14 and report.dequantized == 0
    assert isinstance(layer.weight, Fp8Codes)
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        bits = (lambda t: t.view(torch.uint8)) if tensor.dtype == torch.float8_e4m3fn else (lambda t: t)
        assert got[name].dtype == tensor.dtype and torch.equal(bits(got[name]), bits(tensor)), name
    assert model.config.quantization_config["quant_method"] == "fp8"


# --- bad input --------------------------------------------------------------------------------------------


def test_dequantize_false_on_an_unquantized_checkpoint_is_an_error(
    checkpoints: Checkpoints, registry: Registry
) -> None:
    path = checkpoints(SPECS["per-tensor"], quantized=False)
    with pytest.raises(NotQuantizedError, match="dequantize=False") as error:
        load(path, registry, dequantize=False)
    assert error.value.path == path
    with pytest.raises(NotQuantizedError):
        automodel_plugins.build_model(path, dequantize=False, registry=registry)


def test_build_model_from_a_config_cannot_know_which_weights_are_fp8(registry: Registry) -> None:
    with pytest.raises(TypeError, match="checkpoint path"):
        automodel_plugins.build_model(tiny_config(ODD), dequantize=False, registry=registry)


def test_loading_bf16_data_into_a_resident_model_names_the_key(
    checkpoints: Checkpoints, registry: Registry
) -> None:
    model = automodel_plugins.build_model(
        checkpoints(SPECS["per-tensor"]), dequantize=False, registry=registry
    )
    model.to_empty(device="cpu")
    with pytest.raises(DtypeMismatchError, match="FP8-resident") as error:
        automodel_plugins.load_weights(
            model, checkpoints(SPECS["per-tensor"], quantized=False), registry=registry
        )
    assert error.value.key is not None and error.value.key.endswith(".weight")


def test_asking_for_gradients_of_the_fp8_weights_is_an_error(path: Path, registry: Registry) -> None:
    model = load(path, registry, dequantize=False)
    with pytest.raises(FrozenFp8WeightError, match="frozen"):
        model.requires_grad_(True)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    with pytest.raises(FrozenFp8WeightError):
        layer.weight.requires_grad_(True)


def test_load_weights_fills_a_peft_wrapped_model_built_on_meta(path: Path, registry: Registry) -> None:
    """The sharded flow's order: build on meta, wrap with LoRA (so that FSDP2 would shard the adapters too),
    materialize, load the base weights under their stock names; the adapters are initialized afterwards."""
    expected = with_lora(load(path, registry, dequantize=False))
    model = automodel_plugins.build_model(path, dtype=F32, dequantize=False, registry=registry)
    model = with_lora(model)
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, path, registry=registry)
    assert report.kept_fp8 == 14
    with torch.no_grad():
        for name, tensor in expected.named_parameters():
            if "lora_" in name:
                model.get_parameter(name).copy_(tensor)
        for name, tensor in expected.state_dict().items():
            got = model.state_dict()[name]
            bits = (lambda t: t.view(torch.uint8)) if tensor.dtype == torch.float8_e4m3fn else (lambda t: t)
            assert torch.equal(bits(got), bits(tensor)), name
        assert torch.equal(model(**batch()).loss, expected(**batch()).loss)
