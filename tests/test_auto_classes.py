"""The Auto-class doors (``automodel_plugins.AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` /
``AutoModel``): a claimed checkpoint gives the class and logits of ``automodel_plugins.from_pretrained`` and of
transformers' own Auto class (the independent reference); an unclaimed one gives exactly what transformers'
Auto class gives."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from transformers import LlamaForCausalLM, Ministral3ForCausalLM, Mistral3ForConditionalGeneration
from transformers.utils import logging as hf_logging

import automodel_plugins
from automodel_plugins.errors import ConfigError, LoadOptionError, NoSourceError
from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict
from automodel_plugins.testing.tiny_models import (
    mistral3_image_batch,
    tiny_llama_config,
    tiny_ministral3_config,
    tiny_mistral3_config,
)

hf_logging.disable_progress_bar()
DOORS = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_entry_points(selection="mistral3_fp8")


@pytest.fixture(scope="module")
def vlm() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(
        tiny_mistral3_config(architectures=["Mistral3ForConditionalGeneration"])
    ).eval()


@pytest.fixture(scope="module")
def vlm_path(vlm: Mistral3ForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_checkpoint(vlm, tmp_path_factory.mktemp("mistral3_fp8"))


@pytest.fixture(scope="module")
def text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Ministral3ForCausalLM(tiny_ministral3_config()).eval()
    return write_fp8_checkpoint(
        model, tmp_path_factory.mktemp("ministral3_fp8"), modules_to_not_convert=["lm_head"]
    )


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No plugin claims a Llama: every door goes to transformers."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def inputs(vlm: Mistral3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    return mistral3_image_batch(vlm.config, labels=False, dtype=torch.bfloat16)


def stock(door: str, path: Path, **options: Any) -> Any:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' CPU dequantization notice
    try:
        return getattr(transformers, door).from_pretrained(str(path), local_files_only=True, **options)
    finally:
        hf_logging.set_verbosity(verbosity)


def test_image_text_to_text_door_on_a_claimed_vlm(
    vlm_path: Path, registry: Registry, inputs: dict[str, torch.Tensor]
) -> None:
    door = automodel_plugins.AutoModelForImageTextToText.from_pretrained(vlm_path, registry=registry)
    direct = automodel_plugins.from_pretrained(vlm_path, registry=registry)
    expected = stock("AutoModelForImageTextToText", vlm_path)
    assert type(door) is type(direct) is type(expected) is Mistral3ForConditionalGeneration
    assert (
        door.automodel_composition.plugin == "mistral3_fp8" and door.automodel_composition.forward_overridden
    )
    assert not door.training
    assert_same_logits(door, direct, inputs)
    assert_same_logits(door, expected, inputs)


def test_image_text_to_text_door_takes_transformers_and_host_options(
    vlm_path: Path, registry: Registry, inputs: dict[str, torch.Tensor]
) -> None:
    door = automodel_plugins.AutoModelForImageTextToText.from_pretrained(
        vlm_path, registry=registry, attn_implementation="eager", dtype="auto", dequantize=False
    )
    expected = stock("AutoModelForImageTextToText", vlm_path, attn_implementation="eager")
    assert door.config._attn_implementation == expected.config._attn_implementation == "eager"
    assert door.automodel_composition.fp8_resident
    with torch.no_grad():  # FP8-resident: the same dequantized values, one layer at a time
        torch.testing.assert_close(door(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)


def test_base_model_door_on_a_claimed_vlm(
    vlm_path: Path, registry: Registry, inputs: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    door = automodel_plugins.AutoModel.from_pretrained(vlm_path, registry=registry)
    expected = stock("AutoModel", vlm_path)
    assert type(door) is type(expected) is transformers.Mistral3Model
    assert door.automodel_composition.plugin == "mistral3_fp8"
    assert_same_state_dict(door, expected)
    with torch.no_grad():
        got, want = door(**inputs).last_hidden_state, expected(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # its names are not the checkpoint model's: "as it came" would write BF16 under the source's name
    with pytest.raises(NoSourceError):
        automodel_plugins.save_pretrained(door, tmp_path / "saved")


def test_causal_lm_door_on_a_vlm_fails_as_transformers(vlm_path: Path, registry: Registry) -> None:
    """transformers 5.25 has no causal-LM class for Mistral3Config: the door says the same, before loading."""
    with pytest.raises(ValueError, match="Unrecognized configuration class") as theirs:
        stock("AutoModelForCausalLM", vlm_path)
    with pytest.raises(ConfigError, match="Unrecognized configuration class") as ours:
        automodel_plugins.AutoModelForCausalLM.from_pretrained(vlm_path, registry=registry)
    assert isinstance(ours.value, ValueError)
    assert str(theirs.value).split(".")[0] in str(ours.value)


def test_causal_lm_door_on_a_claimed_text_model(text_path: Path, registry: Registry) -> None:
    door = automodel_plugins.AutoModelForCausalLM.from_pretrained(text_path, registry=registry)
    expected = stock("AutoModelForCausalLM", text_path)
    assert type(door) is type(expected) is Ministral3ForCausalLM
    assert door.automodel_composition.plugin == "mistral3_fp8"
    ids = torch.randint(0, door.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    assert_same_logits(door, expected, {"input_ids": ids})
    with pytest.raises(ConfigError, match="Unrecognized configuration class"):
        automodel_plugins.AutoModelForImageTextToText.from_pretrained(text_path, registry=registry)


@pytest.mark.parametrize("door", ["AutoModelForCausalLM", "AutoModel"])
def test_unclaimed_checkpoint_is_what_transformers_returns(
    llama_path: Path, registry: Registry, door: str
) -> None:
    ours = getattr(automodel_plugins, door).from_pretrained(llama_path, registry=registry)
    expected = stock(door, llama_path)
    assert type(ours) is type(expected)
    assert ours.automodel_composition.plugin is None
    assert ours.dtype == expected.dtype and ours.training == expected.training
    assert_same_state_dict(ours, expected)
    ours_torch_dtype = getattr(automodel_plugins, door).from_pretrained(
        llama_path, registry=registry, torch_dtype=torch.float32, attn_implementation="eager"
    )
    expected_torch_dtype = stock(door, llama_path, torch_dtype=torch.float32, attn_implementation="eager")
    assert ours_torch_dtype.dtype == expected_torch_dtype.dtype == torch.float32
    assert ours_torch_dtype.config._attn_implementation == expected_torch_dtype.config._attn_implementation


def test_unclaimed_image_text_to_text_door_fails_as_transformers(
    llama_path: Path, registry: Registry
) -> None:
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        stock("AutoModelForImageTextToText", llama_path)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        automodel_plugins.AutoModelForImageTextToText.from_pretrained(llama_path, registry=registry)


def test_from_config_on_a_claimed_config_is_composed(
    vlm_path: Path, registry: Registry, inputs: dict[str, torch.Tensor]
) -> None:
    config = automodel_plugins.load_config(vlm_path)
    torch.manual_seed(5)
    ours = automodel_plugins.AutoModelForImageTextToText.from_config(
        config, registry=registry, skip_logits=True
    )
    torch.manual_seed(5)
    expected = transformers.AutoModelForImageTextToText.from_config(automodel_plugins.load_config(vlm_path))
    assert type(ours) is type(expected)
    composition = ours.automodel_composition
    assert composition.plugin == "mistral3_fp8" and composition.forward_overridden
    assert composition.options["skip_logits"] is True
    assert_same_state_dict(ours, expected)
    labels = inputs["input_ids"].clone()
    out = ours.train()(**inputs, labels=labels)
    want = expected.train()(**inputs, labels=labels)
    assert out.logits is None  # skip_logits: the fused loss, no [B, S, V] logits
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_from_config_unclaimed_is_transformers(registry: Registry) -> None:
    torch.manual_seed(5)
    ours = automodel_plugins.AutoModelForCausalLM.from_config(tiny_llama_config(), registry=registry)
    torch.manual_seed(5)
    expected = transformers.AutoModelForCausalLM.from_config(tiny_llama_config())
    assert type(ours) is type(expected) and ours.automodel_composition.plugin is None
    assert_same_state_dict(ours, expected)


def test_doors_are_exported_lazily_and_not_instantiable() -> None:
    for name in DOORS:
        assert name in automodel_plugins.__all__
        door = getattr(automodel_plugins, name)
        assert door.stock() is getattr(transformers, name)
        with pytest.raises(OSError, match="from_pretrained"):
            door()
    with pytest.raises(LoadOptionError, match="positional"):
        automodel_plugins.AutoModel.from_pretrained("unused", "positional")


def test_fused_loss_steps_aside_for_accelerate_dispatch_hooks(
    vlm_path: Path, registry: Registry, inputs: dict[str, torch.Tensor]
) -> None:
    """A multi-device device_map gets accelerate's hooks, which replace ``lm_head.forward`` on the module (to
    move it between devices): the fused loss, which reads ``lm_head.weight`` itself, must not run past them."""
    model = automodel_plugins.from_pretrained(vlm_path, registry=registry, skip_logits=True)
    add_hook_to_module(model.lm_head, AlignDevicesHook(io_same_device=True))
    labels = inputs["input_ids"].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    assert any("forward is replaced on the instance" in str(w.message) for w in caught)
    assert out.logits is not None  # the stock loss, with its logits
