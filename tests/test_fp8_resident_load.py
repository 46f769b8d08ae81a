"""The host's FP8-resident load without any plugin: a tiny Llama written as a block-FP8 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import automodel_plugins
from automodel_plugins.errors import NoPluginClaimError
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import reference_dequantized_state_dict
from automodel_plugins.testing.tiny_models import tiny_llama_config


@pytest.fixture
def llama_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=72)).eval()
    return write_fp8_checkpoint(
        model, tmp_path / "llama", block_size=(16, 16), modules_to_not_convert=["lm_head"]
    )


def test_from_pretrained_without_a_claiming_plugin_refuses_dequantize_false(
    llama_checkpoint: Path, isolated_registry: Registry
) -> None:
    with pytest.raises(NoPluginClaimError, match="dequantize=False"):
        automodel_plugins.from_pretrained(llama_checkpoint, dequantize=False, registry=isolated_registry)


def test_build_model_and_load_weights_work_with_the_host_alone(
    llama_checkpoint: Path, isolated_registry: Registry
) -> None:
    """No plugin: the default adapter (from ``quantization_config``) decides residency, the loader fills it."""
    model = automodel_plugins.build_model(
        llama_checkpoint, dtype=torch.float32, dequantize=False, registry=isolated_registry
    )
    assert model.automodel_composition.plugin is None
    layers = [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert layers == model.automodel_composition.fp8_resident and len(layers) == 14
    assert type(model.lm_head) is torch.nn.Linear  # modules_to_not_convert
    model.to_empty(device="cpu")
    report = automodel_plugins.load_weights(model, llama_checkpoint, registry=isolated_registry)
    assert report.kept_fp8 == 14
    reference = reference_dequantized_state_dict(llama_checkpoint, dtype=torch.float32)
    for name in layers:
        assert torch.equal(model.get_submodule(name).dequantized_weight(), reference[f"{name}.weight"]), name
