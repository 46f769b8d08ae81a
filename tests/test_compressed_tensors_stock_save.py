"""A stock ``save_pretrained`` of an FP8-resident model loaded from compressed-tensors is refused, not written
mislabeled; ``automodel_plugins.save_pretrained`` writes the compressed-tensors checkpoint stock transformers loads.

The defect (before the fix): with ``dequantize=False`` the FP8 layers are ``Fp8Linear`` / ``Fp8Experts``, whose
``state_dict()`` keys are transformers' FP8 names (``weight_scale_inv``, ``activation_scale``), while
``config.quantization_config`` stays compressed-tensors'. ``model.save_pretrained(dir)`` wrote both. What
transformers 5.25 then does with ``dir`` (established here, CPU, tiny Mistral3):

* without the ``compressed-tensors`` package: ``from_pretrained`` raises ImportError (loud);
* with it (0.20.1, needs ``transformers>=4.45``, ``torch>=2.10``; transformers asks ``>=0.15``): the load
  SUCCEEDS with every ``weight_scale`` (and, static per tensor, ``input_scale``) reported MISSING and left as
  ``torch.empty``'s memory (seen: 1.9e22), the saved ``weight_scale_inv`` UNEXPECTED and dropped: FP8 weights
  times garbage, silently wrong logits (:func:`test_the_mislabeled_save_loads_silently_wrong`).

Now the host sets a guard as ``save_pretrained`` on such an instance (:mod:`automodel_plugins.model.
stock_save_guard`): it raises :class:`StockSaveRefusedError` naming the destination and writes nothing. The
renaming fix (``state_dict`` in compressed-tensors' names) is not done: it touches the DCP/FSDP2/EP state dicts
and the host's own save layout. The save the error names, ``automodel_plugins.save_pretrained`` (the source's
format), loads back in stock transformers to the source's tensors and in the host to the same logits.
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


def test_stock_save_is_refused_naming_the_destination_and_writes_nothing(dense: Path, tmp_path: Path) -> None:
    model = resident(dense)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    with pytest.raises(
        StockSaveRefusedError, match=r"automodel_plugins\.save_pretrained\(model, dest\)"
    ) as caught:
        model.save_pretrained(tmp_path / "saved")
    assert isinstance(caught.value, SaveError) and caught.value.path == tmp_path / "saved"
    assert not (tmp_path / "saved").exists()
    assert type(model).save_pretrained is transformers.PreTrainedModel.save_pretrained  # the class untouched
    copied = copy.deepcopy(model)  # a copy is guarded as itself
    with pytest.raises(StockSaveRefusedError):
        copied.save_pretrained(tmp_path / "copied")
    assert copied.save_pretrained.model is copied and not (tmp_path / "copied").exists()


def test_mistral4_experts_stock_save_is_refused(mistral4: dict[str, Any], tmp_path: Path) -> None:
    _, path = mistral4["aligned"]  # 8x8 blocks: attention, dense layers and experts all stay FP8
    model = automodel_plugins.from_pretrained(path, dtype=torch.bfloat16, dequantize=False)
    with pytest.raises(StockSaveRefusedError):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


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


def _stock_compressed_tensors(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    pytest.importorskip("compressed_tensors")
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=F32, output_loading_info=True)


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


def test_the_mislabeled_save_loads_silently_wrong(dense: Path, tmp_path: Path) -> None:
    """Why the stock save is refused: what it wrote (transformers' own save, past the guard) loads in stock
    transformers + compressed-tensors WITHOUT an error, every ``weight_scale`` MISSING (uninitialized)."""
    model = resident(dense)
    type(model).save_pretrained(model, tmp_path / "mislabeled")
    _, info = _stock_compressed_tensors(tmp_path / "mislabeled")
    missing = {key.rsplit(".", 1)[-1] for key in info["missing_keys"]}
    assert "weight_scale" in missing and {k.rsplit(".", 1)[-1] for k in info["unexpected_keys"]} >= {
        "weight_scale_inv"
    }


def test_adapters_added_in_transformers_still_save_alone(dense: Path, tmp_path: Path) -> None:
    """transformers' own PEFT integration (``add_adapter``) saves only the adapters: not refused."""
    peft = pytest.importorskip("peft")
    model = resident(dense)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
