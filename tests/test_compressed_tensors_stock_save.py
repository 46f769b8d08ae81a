"""A stock ``save_pretrained`` of an FP8-resident model loaded from compressed-tensors writes the checkpoint
transformers + the ``compressed-tensors`` package loads with every scale; where no such checkpoint exists (fused
FP8 experts) it is refused, not written mislabeled.

The defect this file first pinned: with ``dequantize=False`` the FP8 layers are ``Fp8Linear`` / ``Fp8Experts``,
whose ``state_dict()`` keys were transformers' FP8 names (``weight_scale_inv``, ``activation_scale``) while
``config.quantization_config`` stays compressed-tensors'. transformers 5.25 + compressed-tensors 0.20.1 loaded
that save with every ``weight_scale`` / ``input_scale`` MISSING (``torch.empty``'s memory, seen 1.9e22): silently
wrong logits. A guard refused the save. Now an ``Fp8Linear`` under a compressed-tensors config shows
``weight_scale`` (``[1]`` per tensor, ``[out, 1]`` per channel, the block grid) and ``input_scale`` (``[1]``) in
``state_dict()`` and takes them in ``load_state_dict`` (:mod:`automodel_plugins.model.compressed_tensors_state`):
the stock save loads in stock transformers + compressed-tensors exactly as the source does (every tensor equal to
its load of the source, nothing missing or unexpected) and in the host bit-identically. Fused FP8-resident experts
have no compressed-tensors form stock transformers loads (its load of the source's own experts reports them
MISSING, :func:`test_stock_compressed_tensors_loads_no_fused_experts`): a stock save of a model holding them is
still refused (:class:`StockSaveRefusedError`, nothing written).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from mistral3_checkpoints import (
    ODD,
    CheckpointSpec,
    checkpoint_tensors,
    edit_tensors,
    image_inputs,
    tiny_model,
    write_checkpoint,
)
from mistral4_checkpoints import stored_tensors
from test_compressed_tensors_hf import CHANNEL, fp8_block, mistral4

import automodel_plugins
from automodel_plugins.errors import SaveError, StockSaveRefusedError
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.testing.compare import assert_same_state_dict

__all__ = ["mistral4"]  # the module fixture, used here

F32 = torch.float32
PLUGIN = "mistral3_fp8"
FORMS = {
    "block-partial-edges": (
        CheckpointSpec(model=ODD, block_size=(16, 16), scale_name="weight_scale", activation_scale_name=None),
        [16, 16],
    ),
    "channel": (
        CheckpointSpec(
            model=ODD, block_size=tuple(CHANNEL), scale_name="weight_scale", activation_scale_name=None
        ),
        CHANNEL,
    ),
    "tensor-static": (CheckpointSpec(scale_name="weight_scale", activation_scale_name="input_scale"), None),
}


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture(scope="module", params=sorted(FORMS))
def dense(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral3 compressed-tensors checkpoint as llm-compressor writes it, in each FP8 form (per-tensor
    scales ``[1]``, the shape compressed-tensors gives them)."""
    spec, block = FORMS[request.param]
    path = write_checkpoint(tiny_model(spec.model), tmp_path_factory.mktemp(request.param) / "ct", spec)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = fp8_block(block)
    (path / "config.json").write_text(json.dumps(config))
    if block is None:
        edit_tensors(path, _one_element_scales)
    return path


def _one_element_scales(tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if key.endswith(("weight_scale", "input_scale")):
            tensors[key] = value.reshape(1)


def resident(path: Path) -> Any:
    return automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(**image_inputs(F32)).logits


def _stock_compressed_tensors(path: Path, dtype: torch.dtype = F32) -> tuple[torch.nn.Module, dict[str, Any]]:
    pytest.importorskip("compressed_tensors")
    return transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, output_loading_info=True
    )


def _assert_stock_loads_it_as_the_source(saved: Path, source: Path) -> None:
    """transformers + compressed-tensors: nothing missing, unexpected or mismatched, and every tensor (FP8 codes,
    ``weight_scale``, ``input_scale``, the rest) equal to its own load of the source checkpoint."""
    stock, info = _stock_compressed_tensors(saved)
    assert not any(info.values()), info
    reference, reference_info = _stock_compressed_tensors(source)
    assert not any(reference_info.values()), reference_info
    state, expected = stock.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert any(key.endswith(".weight_scale") for key in expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_resident_layers_show_compressed_tensors_names_and_shapes(dense: Path) -> None:
    model = resident(dense)
    layer = model.model.language_model.layers[0].mlp.down_proj
    state = model.state_dict()
    prefix = "model.language_model.layers.0.mlp.down_proj."
    keys = [key.removeprefix(prefix) for key in state if key.startswith(prefix)]
    per_tensor = layer.block_size is None
    assert keys == ["weight", "weight_scale", *(["input_scale"] if per_tensor else [])]
    source = checkpoint_tensors(dense)["language_model.model.layers.0.mlp.down_proj.weight_scale"]
    assert tuple(state[prefix + "weight_scale"].shape) == tuple(source.shape)  # [1], [out, 1] or the grid
    assert torch.equal(state[prefix + "weight_scale"], source.float())
    if per_tensor:
        assert tuple(state[prefix + "input_scale"].shape) == (1,)
    # views of the buffers (an in-place load into a state dict reaches the layer), and attributes (DCP's FQNs)
    assert state[prefix + "weight_scale"].data_ptr() == layer.weight_scale_inv.data_ptr()
    assert torch.equal(layer.weight_scale, state[prefix + "weight_scale"])
    assert not any(key.endswith(("weight_scale_inv", "activation_scale")) for key in state)


def test_load_state_dict_takes_the_compressed_tensors_names(dense: Path) -> None:
    model, other = resident(dense), resident(dense)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    prefix = "model.language_model.layers.0.self_attn.q_proj."
    state[prefix + "weight_scale"] = state[prefix + "weight_scale"] * 2
    assert not other.load_state_dict(state, strict=True).unexpected_keys
    layer = other.model.language_model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight_scale_inv.reshape(-1), state[prefix + "weight_scale"].reshape(-1))
    if layer.activation_scale is None:  # dynamic activations: an input_scale is unexpected, named as given
        extra = {**state, prefix + "input_scale": torch.ones(1)}
        assert other.load_state_dict(extra, strict=False).unexpected_keys == [prefix + "input_scale"]
    del state[prefix + "weight_scale"]
    missing = other.load_state_dict(state, strict=False).missing_keys
    assert missing == [prefix + "weight_scale"]  # named as state_dict() shows it


def test_stock_save_loads_in_stock_compressed_tensors_as_the_source(dense: Path, tmp_path: Path) -> None:
    model = resident(dense)
    expected = logits(model)
    model.save_pretrained(tmp_path / "stock")
    written = json.loads((tmp_path / "stock" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((dense / "config.json").read_text())["quantization_config"]
    again = resident(tmp_path / "stock")  # the host loads it back bit for bit
    assert_same_state_dict(again, model)
    assert torch.equal(logits(again), expected)
    assert torch.equal(logits(automodel_plugins.from_pretrained(tmp_path / "stock", dtype=F32)), expected)
    copied = copy.deepcopy(model)  # a copy shows the same names
    assert copied.state_dict().keys() == model.state_dict().keys()
    _assert_stock_loads_it_as_the_source(tmp_path / "stock", dense)  # skipped without compressed-tensors


def test_stock_save_after_a_partial_merge(dense: Path, tmp_path: Path) -> None:
    """LoRA merged into q/v (plain linears, joined to ``ignore``), the other layers still FP8-resident: stock
    transformers + compressed-tensors loads the stock save with nothing missing, the merged weights as merged and
    every other tensor as its own load of the source. (Its logits are not compared: compressed-tensors runs its
    activations' fake quantization, which the host does not.)"""
    peft = pytest.importorskip("peft")
    model = resident(dense)
    targets = r".*language_model.*\.(q_proj|v_proj)"  # the FP8 ones (the vision tower's are BF16)
    config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    merged = automodel_plugins.merge_lora(peft.get_peft_model(model, config))
    assert isinstance(merged.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    merged_weights = {
        name: module.weight.detach().clone()
        for name, module in merged.named_modules()
        if name.endswith(("q_proj", "v_proj")) and "language_model" in name
    }
    ignore = merged.config.quantization_config["ignore"]
    assert set(merged_weights) <= set(ignore)
    merged.save_pretrained(tmp_path / "merged")
    stock, info = _stock_compressed_tensors(tmp_path / "merged")
    assert not any(info.values()), info
    reference, _ = _stock_compressed_tensors(dense)
    state, expected = stock.state_dict(), reference.state_dict()
    assert len(merged_weights) == 4
    for name, weight in merged_weights.items():
        assert not any(key.startswith(name + ".weight_scale") for key in state), name
        assert state[name + ".weight"].dtype == F32 and torch.equal(state[name + ".weight"], weight), name
    merged_keys = {name + ".weight" for name in merged_weights}
    others = [key for key in expected if key not in merged_keys and not key.startswith(tuple(merged_weights))]
    assert any(key.endswith(".weight_scale") for key in others)
    for key in others:
        assert state[key].dtype == expected[key].dtype and torch.equal(state[key], expected[key]), key


def test_mistral4_experts_stock_save_is_refused(mistral4: dict[str, Any], tmp_path: Path) -> None:
    _, path = mistral4["aligned"]  # 8x8 blocks: attention, dense layers and experts all stay FP8
    model = automodel_plugins.from_pretrained(path, dtype=torch.bfloat16, dequantize=False)
    with pytest.raises(
        StockSaveRefusedError,
        match=r"layers\.1\.mlp\.experts.*automodel_plugins\.save_pretrained\(model, dest\)",
    ) as caught:
        model.save_pretrained(tmp_path / "saved")
    assert isinstance(caught.value, SaveError) and caught.value.path == tmp_path / "saved"
    assert not (tmp_path / "saved").exists()
    assert type(model).save_pretrained is transformers.PreTrainedModel.save_pretrained  # the class untouched
    copied = copy.deepcopy(model)  # a copy is guarded as itself
    with pytest.raises(StockSaveRefusedError):
        copied.save_pretrained(tmp_path / "copied")
    assert copied.save_pretrained.model is copied and not (tmp_path / "copied").exists()
    # its linears show compressed-tensors names all the same
    assert "model.language_model.layers.0.self_attn.q_b_proj.weight_scale" in model.state_dict()


def test_stock_compressed_tensors_loads_no_fused_experts(mistral4: dict[str, Any]) -> None:
    """Why the experts' stock save stays refused: transformers + compressed-tensors reads no fused experts from a
    compressed-tensors checkpoint, the source's own per-expert FP8 linears included."""
    _, path = mistral4["aligned"]
    _, info = _stock_compressed_tensors(path, torch.bfloat16)
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in info["missing_keys"]
    assert "model.language_model.layers.1.mlp.experts.0.gate_proj.weight_scale" in info["unexpected_keys"]


def test_a_dequantized_load_and_a_fully_merged_model_save_as_stock(dense: Path, tmp_path: Path) -> None:
    """Nothing FP8 held, nothing mislabeled: transformers' own save, loaded back by stock transformers."""
    dequantized = automodel_plugins.from_pretrained(dense, dtype=F32)
    dequantized.save_pretrained(tmp_path / "dense")
    stock = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "dense", dtype=F32)
    assert torch.equal(logits(stock), logits(dequantized))
    peft = pytest.importorskip("peft")
    model = resident(dense)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    merged = peft.get_peft_model(model, config).merge_and_unload()
    assert "quantization_config" not in merged.config.to_dict()
    expected = logits(merged)
    merged.save_pretrained(tmp_path / "merged")
    stock = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=F32)
    assert torch.allclose(logits(stock), expected, rtol=1e-5, atol=1e-5)


def test_the_save_the_error_names_loads_back_to_the_source(dense: Path, tmp_path: Path) -> None:
    model = resident(dense)
    expected = logits(model)
    automodel_plugins.save_pretrained(model, tmp_path / "saved")
    source, saved = checkpoint_tensors(dense), stored_tensors(tmp_path / "saved")
    assert saved.keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(saved[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    for dequantize in (False, True):
        again = automodel_plugins.from_pretrained(tmp_path / "saved", dtype=F32, dequantize=dequantize)
        assert torch.equal(logits(again), expected), dequantize


def test_stock_transformers_loads_that_save_with_every_scale(dense: Path, tmp_path: Path) -> None:
    """transformers + compressed-tensors (FP8 kept as compressed-tensors' quantized ``Linear``) reads every
    ``weight_scale`` / ``input_scale`` of the host's save, equal to the source's."""
    automodel_plugins.save_pretrained(resident(dense), tmp_path / "saved")
    stock, info = _stock_compressed_tensors(tmp_path / "saved")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = stock.state_dict()
    source = checkpoint_tensors(dense)
    for key, value in source.items():
        runtime = "model.language_model." + key.removeprefix("language_model.model.")
        if key.endswith(("weight_scale", "input_scale")):
            assert torch.equal(state[runtime].reshape(value.shape), value.float()), key
        elif value.dtype == torch.float8_e4m3fn:
            assert torch.equal(state[runtime].view(torch.uint8), value.view(torch.uint8)), key


def test_adapters_added_in_transformers_still_save_alone(dense: Path, tmp_path: Path) -> None:
    """transformers' own PEFT integration (``add_adapter``) saves only the adapters: not refused."""
    peft = pytest.importorskip("peft")
    model = resident(dense)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
