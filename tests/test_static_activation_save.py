"""An FP8-resident model loaded from a static-activation checkpoint keeps each layer's ``activation_scale``, so a
STOCK ``save_pretrained`` writes a checkpoint whose ``activation_scheme: "static"`` is true.

The defect (before the fix): the Mistral3 FP8 releases store a 0-d ``activation_scale`` beside every FP8 linear
weight under ``quantization_config.activation_scheme: "static"``. ``Fp8Linear`` dropped it, so
``model.save_pretrained(dir)`` wrote no ``activation_scale`` while the config still said static. transformers
5.25 on an FP8 GPU (reproduced here on CPU: :mod:`stock_fp8`) then built every ``FP8Linear`` with its
``activation_scale`` reported MISSING and left as ``torch.empty``'s memory (seen: -1.2e36), which its FP8 matmul
divides the input by: silently wrong outputs. Mistral Small 4's fused experts (``gate_up_proj_activation_scale``
``[E]``) the same through ``Fp8Experts``.

Now each resident module holds the checkpoint's static activation scale as a persistent fp32 buffer under
transformers' name and shape (0-d ``activation_scale``; ``[E]`` ``<projection>_activation_scale`` for experts),
never used by its own forward (logits unchanged). References: the source checkpoint's own tensors (read with
safetensors), and stock transformers loading the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import (
    Checkpoints,
    CheckpointSpec,
    checkpoint_tensors,
    checkpoints,
    edit_config,
    edit_tensors,
    image_inputs,
    legacy_name,
    registry,
    stock_load,
)
from stock_fp8 import stock_fp8_load

import automodel_plugins
from automodel_plugins.errors import ScaleError
from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.registry import Registry

peft = pytest.importorskip("peft")

__all__ = ["checkpoints", "registry"]  # the session fixtures, used here

F32 = torch.float32
SPECS = {"per-tensor": CheckpointSpec(), "block": CheckpointSpec(block_size=(32, 32))}
ATTENTION = ["q_proj", "v_proj"]
TEXT = "model.language_model.layers"
MERGED = [f"{TEXT}.{i}.self_attn.{p}" for i in range(2) for p in ATTENTION]


def distinct_activation_scales(tensors: dict[str, torch.Tensor]) -> None:
    """Give every ``activation_scale`` its own value (the generator writes 1.0 everywhere)."""
    for index, key in enumerate(sorted(k for k in tensors if k.endswith(".activation_scale"))):
        tensors[key] = torch.tensor(0.5 + index / 16, dtype=F32)


@pytest.fixture(scope="module", params=sorted(SPECS))
def path(
    request: pytest.FixtureRequest, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    copy = checkpoints.copy(tmp_path_factory.mktemp(request.param) / "ckpt", SPECS[request.param])
    edit_tensors(copy, distinct_activation_scales)
    return copy


def resident(path: Path, registry: Registry) -> Any:
    return automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False, registry=registry)


def source_activation_scales(path: Path) -> dict[str, torch.Tensor]:
    """Runtime module name -> the source checkpoint's ``activation_scale`` (legacy keys mapped back)."""
    out = {}
    for key, value in checkpoint_tensors(path).items():
        if key.endswith(".activation_scale"):
            runtime = "model.language_model." + key.removeprefix("language_model.model.")
            assert legacy_name(runtime) == key, key
            out[runtime.removesuffix(".activation_scale")] = value
    return out


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(**image_inputs(F32)).logits


def fp8_layers(model: torch.nn.Module) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_resident_layers_hold_the_checkpoint_static_activation_scales(path: Path, registry: Registry) -> None:
    expected = source_activation_scales(path)
    model = resident(path, registry)
    layers = fp8_layers(model)
    assert sorted(layers) == sorted(expected) and len(layers) == 14
    state = model.state_dict()
    for name, layer in layers.items():
        assert layer.activation_scale.dtype == F32 and layer.activation_scale.shape == ()
        assert torch.equal(layer.activation_scale, expected[name]), name
        assert torch.equal(state[f"{name}.activation_scale"], expected[name]), name
    # the forward does not use it: the logits are the dequantized model's (stock transformers on CPU)
    assert torch.equal(logits(model), logits(stock_load(path, dtype=F32)))
    model.to(torch.bfloat16)  # a cast keeps it fp32, like the weight scale
    assert all(layer.activation_scale.dtype == F32 for layer in layers.values())


def test_a_state_dict_round_trip_keeps_the_activation_scales_in_any_stored_dtype(
    path: Path, registry: Registry
) -> None:
    model = resident(path, registry)
    state = model.state_dict()
    name = f"{TEXT}.1.mlp.down_proj"
    state[f"{name}.activation_scale"] = torch.tensor([0.75], dtype=torch.bfloat16)  # [1], bf16: as stored
    model.load_state_dict(state, strict=True)
    layer = model.get_submodule(name)
    assert layer.activation_scale.dtype == F32 and torch.equal(layer.activation_scale, torch.tensor(0.75))


def test_stock_save_then_transformers_fp8_gpu_path_finds_every_activation_scale(
    path: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What transformers builds on an FP8 GPU from the stock save: before the fix, 14 MISSING
    ``activation_scale`` left uninitialized under ``activation_scheme: "static"``."""
    source = checkpoint_tensors(path)
    expected = source_activation_scales(path)
    resident(path, registry).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert config["activation_scheme"] == "static"
    stock, info = stock_fp8_load(tmp_path / "saved", monkeypatch, dtype=F32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    built = {n: m for n, m in stock.named_modules() if type(m).__name__ == "FP8Linear"}
    assert sorted(built) == sorted(expected)
    for name, layer in built.items():
        assert torch.equal(layer.activation_scale.detach(), expected[name]), name
        weight = legacy_name(f"{name}.weight")
        assert torch.equal(layer.weight.view(torch.uint8), source[weight].view(torch.uint8)), name
        scale = source[weight.removesuffix("weight") + "weight_scale_inv"]
        assert torch.equal(layer.weight_scale_inv.detach().reshape(scale.shape), scale), name


def test_stock_save_loads_back_with_the_same_logits(path: Path, registry: Registry, tmp_path: Path) -> None:
    model = resident(path, registry)
    expected = logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(stock_load(tmp_path / "saved", dtype=F32)), expected)  # stock, CPU
    for dequantize in (True, False):
        again = automodel_plugins.from_pretrained(
            tmp_path / "saved", dtype=F32, dequantize=dequantize, registry=registry
        )
        assert torch.equal(logits(again), expected), dequantize
    for name, scale in source_activation_scales(path).items():
        assert torch.equal(again.get_submodule(name).activation_scale, scale), name


def test_after_a_lora_merge_the_unmerged_layers_keep_their_activation_scales(
    path: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)
    merged = peft.get_peft_model(resident(path, registry), lora).merge_and_unload()
    expected_logits = logits(merged)
    merged.save_pretrained(tmp_path / "merged")
    saved = checkpoint_tensors(tmp_path / "merged")
    merged_keys = {legacy_name(f"{name}.activation_scale") for name in MERGED}
    assert not merged_keys & set(saved) and len([k for k in saved if k.endswith("activation_scale")]) == 10
    assert torch.equal(logits(stock_load(tmp_path / "merged", dtype=F32)), expected_logits)
    expected = source_activation_scales(path)
    stock, info = stock_fp8_load(tmp_path / "merged", monkeypatch, dtype=F32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name in expected:
        layer = stock.get_submodule(name)
        if name in MERGED:  # dequantized + delta: a plain linear, no activation scale
            assert type(layer) is torch.nn.Linear, name
        else:
            assert type(layer).__name__ == "FP8Linear", name
            assert torch.equal(layer.activation_scale.detach(), expected[name]), name


def test_an_unmerged_layer_is_fp8_again_with_its_activation_scale(
    path: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)
    model = peft.get_peft_model(resident(path, registry), lora)
    model.merge_adapter()
    model.unmerge_adapter()
    model.unload().save_pretrained(tmp_path / "saved")
    expected = source_activation_scales(path)
    stock, info = stock_fp8_load(tmp_path / "saved", monkeypatch, dtype=F32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name in expected:
        assert torch.equal(stock.get_submodule(name).activation_scale.detach(), expected[name]), name


def test_source_format_save_carries_the_source_activation_scales_once(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    """``automodel_plugins.save_pretrained`` (``quantization="source"``) writes each source activation scale
    once, byte for byte, beside the resident layers and beside the merged ones it re-quantizes."""
    source = {k: v for k, v in checkpoint_tensors(path).items() if k.endswith("activation_scale")}
    model = resident(path, registry)
    automodel_plugins.save_pretrained(model, tmp_path / "resident", registry=registry)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)
    merged = automodel_plugins.merge_lora(peft.get_peft_model(resident(path, registry), lora))
    automodel_plugins.save_pretrained(merged, tmp_path / "merged", registry=registry)
    for name in ("resident", "merged"):
        saved = {
            k: v for k, v in checkpoint_tensors(tmp_path / name).items() if k.endswith("activation_scale")
        }
        assert sorted(saved) == sorted(source), name
        assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in source.items()), name


def test_a_dynamic_checkpoint_gives_no_activation_scale(
    checkpoints: Checkpoints, registry: Registry, tmp_path: Path
) -> None:
    path = checkpoints.copy(tmp_path / "ckpt", CheckpointSpec(activation_scale_name=None))
    edit_config(path, lambda config: config["quantization_config"].update(activation_scheme="dynamic"))
    model = resident(path, registry)
    assert all(layer.activation_scale is None for layer in fp8_layers(model).values())
    assert not [k for k in model.state_dict() if k.endswith("activation_scale")]


@pytest.mark.parametrize("bad", [0.0, float("nan"), -1.0])
def test_an_activation_scale_that_is_not_finite_and_positive_is_refused(
    checkpoints: Checkpoints, registry: Registry, tmp_path: Path, bad: float
) -> None:
    path = checkpoints.copy(tmp_path / "ckpt", CheckpointSpec())
    key = "language_model.model.layers.1.mlp.up_proj.activation_scale"
    edit_tensors(path, lambda tensors: tensors.update({key: torch.tensor(bad)}))
    with pytest.raises(ScaleError, match="static activation scale is not finite and positive") as caught:
        resident(path, registry)
    assert caught.value.key == key


# --- Mistral Small 4: fused experts with one static activation scale per expert ----------------------------


@pytest.fixture
def mistral4(plugin_registry: Any) -> Any:
    mistral4_checkpoints = pytest.importorskip("mistral4_checkpoints")
    plugin_registry(mistral4_checkpoints.PLUGIN)
    return mistral4_checkpoints


def test_fp8_experts_keep_their_per_expert_activation_scales_through_a_stock_save(
    mistral4: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mistral4.write_checkpoint(mistral4.tiny_model(), tmp_path / "source", "per-tensor")
    source = mistral4.stored_tensors(path)
    model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Experts)}
    assert len(experts) == 2
    for name, module in experts.items():
        for projection in ("gate_up_proj", "down_proj"):
            held = getattr(module, f"{projection}_activation_scale")
            stored = source[mistral4.legacy_key(f"{name}.{projection}_activation_scale")]
            assert held.dtype == F32 and torch.equal(held, stored), (name, projection)
    model.save_pretrained(tmp_path / "saved")
    # transformers 5.25's FP8Experts wants per-tensor gate_up scales [E, 2, 1] (gate and up apart) where Small 4
    # stores [E, 1, 1]: it refuses the source itself the same way, so that mismatch is allowed, nothing else
    loads = {}
    for name in ("source", "saved"):
        stock, info = stock_fp8_load(tmp_path / name, monkeypatch, dtype=F32, ignore_mismatched_sizes=True)
        loads[name] = {"missing": info["missing_keys"], "unexpected": info["unexpected_keys"]}
        loads[name]["mismatched"] = sorted(key for key, *_ in info["mismatched_keys"])
    assert loads["saved"] == loads["source"], loads
    assert not loads["saved"]["missing"] and not loads["saved"]["unexpected"], loads
    assert all(key.endswith("gate_up_proj_scale_inv") for key in loads["saved"]["mismatched"]), loads
    for name in experts:
        built = stock.get_submodule(name)
        assert type(built).__name__ == "FP8Experts", name
        for projection in ("gate_up_proj", "down_proj"):
            stored = source[mistral4.legacy_key(f"{name}.{projection}_activation_scale")]
            assert torch.equal(getattr(built, f"{projection}_activation_scale").detach(), stored)
    linears = [n for n, m in stock.named_modules() if type(m).__name__ == "FP8Linear"]
    assert linears
    for name in linears:
        stored = source[mistral4.legacy_key(f"{name}.activation_scale")]
        assert torch.equal(stock.get_submodule(name).activation_scale.detach(), stored), name


def test_experts_whose_activation_scales_are_stored_per_piece_are_dequantized_not_saved_lying(
    mistral4: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-expert pieces each with its own static activation scale (gate and up apart) do not fit
    ``FP8Experts``' one scale per fused projection and expert: those experts are dequantized (and so listed in
    ``modules_to_not_convert``), rather than kept FP8 and saved under a static config without their scales."""
    path = mistral4.write_checkpoint(
        mistral4.tiny_model(), tmp_path / "source", "block-per-expert", block=(8, 8)
    )
    control = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    assert (
        len([m for m in control.modules() if isinstance(m, Fp8Experts)]) == 2
    )  # aligned: resident without them

    def add_activation_scales(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
            tensors[key.removesuffix("weight_scale_inv") + "activation_scale"] = torch.rand(()) + 0.5

    edit_tensors(path, add_activation_scales)
    edit_config(path, lambda config: config["quantization_config"].update(activation_scheme="static"))
    with pytest.warns(UserWarning, match="per expert piece"):
        model = automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)
    assert not [m for m in model.modules() if isinstance(m, Fp8Experts)]
    experts = [f"model.language_model.layers.{i}.mlp.experts" for i in (1, 2)]
    assert sorted(model.automodel_composition.fp8_not_resident) == sorted(
        f"{name}.{p}" for name in experts for p in ("gate_up_proj", "down_proj")
    )
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert config["activation_scheme"] == "static" and set(experts) <= set(config["modules_to_not_convert"])
    stock, info = stock_fp8_load(tmp_path / "saved", monkeypatch, dtype=F32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name in experts:
        built = stock.get_submodule(name)
        assert type(built).__name__ != "FP8Experts", name
        for p in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(built, p), getattr(model.get_submodule(name), p)), (name, p)
    linears = {n: m for n, m in stock.named_modules() if type(m).__name__ == "FP8Linear"}
    assert linears and all(m.activation_scale is not None for m in linears.values())


# --- Mistral-native: qscale_act, q/k stored in rotary order ------------------------------------------------


def test_native_qscale_act_is_kept_on_every_layer_and_saved_as_transformers_names_it(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native checkpoint's ``qscale_act`` (``qscheme_act: "TENSOR"``: static) is the same multiplier as
    ``activation_scale`` (transformers' converter renames one into the other); q/k are stored in rotary order
    (a one-piece source with its rows reordered: a per-tensor scale is unaffected)."""
    from mistral_native_checkpoints import native_key, native_tensors, params_of, write_fp8_native
    from safetensors.torch import save_file
    from transformers import Mistral3ForConditionalGeneration

    from automodel_plugins.testing.tiny_models import tiny_mistral3_config

    torch.manual_seed(0)
    reference = Mistral3ForConditionalGeneration(tiny_mistral3_config(vision={"hidden_act": "silu"})).eval()
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "params.json").write_text(json.dumps(params_of(reference.config)))
    save_file(native_tensors(reference), tmp_path / "bf16" / "consolidated.safetensors")
    tensors = write_fp8_native(tmp_path / "bf16", reference, tmp_path / "native")
    acts = sorted(k for k in tensors if k.endswith(".qscale_act"))
    for index, key in enumerate(acts):
        tensors[key] = torch.tensor(0.5 + index / 16)
    save_file(tensors, tmp_path / "native" / "consolidated.safetensors")
    model = automodel_plugins.from_pretrained(
        tmp_path / "native", dtype=F32, dequantize=False, registry=registry
    )
    layers = fp8_layers(model)
    assert len(layers) == len(acts) and any(name.endswith("q_proj") for name in layers)
    for name, layer in layers.items():
        stored = tensors[native_key(f"{name}.weight").removesuffix("weight") + "qscale_act"]
        assert torch.equal(layer.activation_scale, stored.float()), name
    model.save_pretrained(tmp_path / "saved")
    assert (
        json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"][
            "activation_scheme"
        ]
        == "static"
    )
    stock, info = stock_fp8_load(tmp_path / "saved", monkeypatch, dtype=F32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, layer in layers.items():
        assert torch.equal(stock.get_submodule(name).activation_scale.detach(), layer.activation_scale), name
