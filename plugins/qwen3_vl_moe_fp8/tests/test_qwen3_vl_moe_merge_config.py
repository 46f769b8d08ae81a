"""``quantization_config`` of an FP8-resident Qwen3-VL-MoE names FP8 exactly what the model holds in FP8, so a
stock ``save_pretrained`` writes a checkpoint transformers reads as it is.

Experts whose pieces are off the block boundaries are dequantized at a ``dequantize=False`` load (the attention
stays FP8). Before, the config still named them FP8: a stock save wrote their BF16/FP32 fused tensors without
scales, and transformers' non-dequantizing (GPU) path made them ``FP8Experts``, the weights cast into FP8 codes
and ``*_scale_inv`` MISSING (left uninitialized). Now they are listed in ``modules_to_not_convert`` from the
load on, and merging LoRA on the attention adds the merged layers after them. (transformers decides to
dequantize only in ``validate_environment``, by the device; the tests keep ``dequantize=False`` past it, as on
an FP8 GPU, and compare the weights: the forward of its FP8 modules needs its Triton kernels.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from moe_checkpoints import LAYERS, NOT_CONVERTED, PLUGIN
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

import automodel_plugins
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_linear import Fp8Linear

F32 = torch.float32
EXPERTS = [f"model.language_model.layers.{i}.mlp.experts" for i in range(LAYERS)]
Q_PROJ = [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


@pytest.fixture
def misfit(moe_checkpoint: Any) -> Path:
    """Per-expert 16x16-block pieces: the experts cannot stay FP8 (intermediate 24 is not on a boundary)."""
    return moe_checkpoint(experts="per-expert", block_size=(16, 16))


def load_resident(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot stay FP8")
        return automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)


def stock_fp8_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    """transformers' load as on an FP8 GPU: its FP8 modules for what the config names FP8, not dequantized."""
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=F32, output_loading_info=True)


def test_experts_dequantized_at_load_are_not_named_fp8(
    misfit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_resident(misfit)
    assert quantization_dict(model.config)["modules_to_not_convert"] == [*NOT_CONVERTED, *EXPERTS]
    model.save_pretrained(tmp_path / "saved")
    stock, info = stock_fp8_load(tmp_path / "saved", monkeypatch)
    assert not info["missing_keys"], sorted(info["missing_keys"])  # before: the experts' *_scale_inv
    for name in EXPERTS:
        ours, loaded = model.get_submodule(name), stock.get_submodule(name)
        assert type(loaded) is type(ours), name  # the stock experts module, not FP8Experts
        for tensor in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(loaded, tensor), getattr(ours, tensor)), f"{name}.{tensor}"
    attention = stock.get_submodule("model.language_model.layers.0.self_attn")
    assert all(type(getattr(attention, p)).__name__ == "FP8Linear" for p in ("q_proj", "k_proj", "v_proj"))


def test_a_merge_adds_the_merged_layers_after_them_and_an_unmerge_takes_them_out(
    misfit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(load_resident(misfit), config)
    loaded = quantization_dict(model.config)
    model.merge_adapter()
    assert quantization_dict(model.config)["modules_to_not_convert"] == [*NOT_CONVERTED, *EXPERTS, *Q_PROJ]
    model.unmerge_adapter()
    assert quantization_dict(model.config) == loaded
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    stock, info = stock_fp8_load(tmp_path / "merged", monkeypatch)
    assert not info["missing_keys"], sorted(info["missing_keys"])
    for name in Q_PROJ:
        assert type(stock.get_submodule(name)) is torch.nn.Linear, name
        assert torch.equal(stock.get_submodule(name).weight, merged.get_submodule(name).weight), name
    kept = [n for n, m in merged.named_modules() if isinstance(m, Fp8Linear)]
    assert kept and all(type(stock.get_submodule(n)).__name__ == "FP8Linear" for n in kept)
