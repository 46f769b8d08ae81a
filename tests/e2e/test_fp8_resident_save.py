"""``automodel_plugins.save_pretrained`` of an FP8-resident model (``from_pretrained(..., dequantize=False)``) and
of one whose LoRA was merged: the way out of a QLoRA-style fine-tune.

An FP8-resident layer is saved as the linear it stands for (its dequantized weight), never as its raw codes.
References: the source checkpoint's own bytes (a source save of untouched layers gives them back), stock
transformers reading what was written, and the dequantized model (``dequantize=True``) of the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import ODD, Checkpoints, CheckpointSpec, checkpoint_tensors, tiny_config
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins import from_pretrained
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.registry import Registry
from automodel_plugins.testing.tiny_models import mistral3_image_batch

from .test_save_fp8 import assert_same_tensors

peft = pytest.importorskip("peft")

SPECS = {
    "per-tensor": CheckpointSpec(model=ODD),
    "block": CheckpointSpec(model=ODD, block_size=(32, 32)),  # partial edge blocks on both axes
}
F32 = torch.float32
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


@pytest.fixture(scope="module", params=sorted(SPECS))
def path(request: pytest.FixtureRequest, checkpoints: Checkpoints) -> Path:
    return checkpoints(SPECS[request.param])


def resident(path: Path, registry: Registry) -> Any:
    return from_pretrained(path, dtype=F32, dequantize=False, registry=registry)


def save(model: Any, dest: Path, registry: Registry, **options: Any) -> Any:
    return automodel_plugins.save_pretrained(model, dest, progress=False, registry=registry, **options)


def inputs() -> dict[str, torch.Tensor]:
    batch = mistral3_image_batch(tiny_config(ODD), batch=2, seq=15, image_rows=1, dtype=F32)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_a_source_save_right_after_a_resident_load_gives_back_the_source_bytes(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    model = resident(path, registry)
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    report = save(model, tmp_path / "saved", registry)
    assert report.quantized > 0 and report.scales_fresh == 0
    assert_same_tensors(checkpoint_tensors(tmp_path / "saved"), checkpoint_tensors(path))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((path / "config.json").read_text())["quantization_config"]


def test_the_none_format_of_a_resident_model_is_the_dequantized_model(
    path: Path, registry: Registry, tmp_path: Path
) -> None:
    """``"none"`` writes what a dequantizing load holds, never the uint8 codes: stock transformers reads it
    back bit for bit equal to ``from_pretrained(path)``."""
    save(resident(path, registry), tmp_path / "plain", registry, quantization="none")
    tensors = checkpoint_tensors(tmp_path / "plain")
    assert not any(t.dtype in (torch.uint8, torch.float8_e4m3fn) for t in tensors.values())
    assert not any(key.endswith("_scale_inv") for key in tensors)
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "plain", dtype=F32).eval()
    dequantized = from_pretrained(path, dtype=F32, registry=registry)
    for name, value in dequantized.state_dict().items():
        assert torch.equal(stock.state_dict()[name], value), name


def test_a_merged_lora_is_requantized_under_the_scale_policy(
    checkpoints: Checkpoints, registry: Registry, tmp_path: Path
) -> None:
    """LoRA trained on the FP8-resident base, merged into BF16/fp32 linears, then saved in the source format:
    merged layers get FP8 again (a fresh scale where the delta pushed amax past the source's), untouched
    layers keep their bytes, and stock transformers' FP8 loader reads weights within one FP8 step of the
    merged model's."""
    path = checkpoints(SPECS["per-tensor"])
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(resident(path, registry), config)
    merged = automodel_plugins.merge_lora(model)
    q_proj = merged.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear  # merged: a plain linear in the compute dtype
    report = save(merged, tmp_path / "saved", registry)
    written = checkpoint_tensors(tmp_path / "saved")
    source = checkpoint_tensors(path)
    q_key = "language_model.model.layers.0.self_attn.q_proj.weight"
    up_key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert written[q_key].dtype == torch.float8_e4m3fn and report.scales_fresh >= 1
    assert torch.equal(written[up_key].view(torch.uint8), source[up_key].view(torch.uint8))
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=F32).eval()
    got = stock.model.language_model.layers[0].self_attn.q_proj.weight
    scale = written[q_key.removesuffix("weight") + "weight_scale_inv"].float()
    # One FP8 step at |w| is at most 2**-3 * |w| (3 mantissa bits), and w's own scale bounds it at large |w|.
    want = q_proj.weight.detach()
    step = torch.maximum(want.abs() / 8, scale * 2**-9)
    assert bool(((got - want).abs() <= step).all())
    assert float(want.abs().max() / scale) <= E4M3_MAX * 1.04
