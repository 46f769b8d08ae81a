"""``config.json``'s ``dtype`` names the dtype of the tensors a save writes, at the top and in every sub-config, so
stock ``from_pretrained(dtype="auto")`` loads a saved checkpoint in the dtype its tensors are, as it loads the
source.

The defect (before the fix): ``save_pretrained(model, dir, quantization="source")`` of a model loaded in float32
from a bfloat16 FP8 checkpoint wrote the source's BF16 tensors (as ``"source"`` promises) under ``"dtype":
"float32"`` (the model's), in ``text_config`` / ``vision_config`` too; stock transformers then loaded it in
float32, a different model from the source's (which it loads in bfloat16). The same from one process and from
an FSDP2-sharded model (one gloo rank, in-process; the code is shared). ``quantization="none"`` / the FP8 formats
write the model's dtype and ``convert`` builds its model in the dtype it writes: those were right, and stay so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import CheckpointSpec, legacy_name, tiny_model, write_checkpoint
from safetensors import safe_open
from test_fsdp_save_config import single_rank_mesh
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

__all__ = ["single_rank_mesh"]  # the fixture, used here

PLUGIN = "mistral3_fp8"
SUB_CONFIGS = ("text_config", "vision_config")
NAMES = {"F32": torch.float32, "BF16": torch.bfloat16}
SCALES = ("weight_scale_inv", "activation_scale")


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def _source(root: Path, dtype: torch.dtype) -> Path:
    """A tiny Mistral3 (text_config + vision_config) per-tensor FP8 checkpoint whose other tensors are ``dtype``."""
    if dtype == torch.bfloat16:
        return write_checkpoint(tiny_model(), root / "src-bf16", CheckpointSpec())
    return write_fp8_checkpoint(tiny_model(), root / "src-fp32", dtype=dtype, rename=legacy_name)


def _stored_dtypes(directory: Path) -> set[torch.dtype]:
    """The dtypes of the tensors written other than FP8 weights and their scales (from the headers)."""
    out = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                stored = str(handle.get_slice(key).get_dtype())
                if stored != "F8_E4M3" and not key.endswith(SCALES):
                    out.add(NAMES[stored])
    return out


def _fp8_keys(directory: Path) -> set[str]:
    out = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            out |= {k for k in handle.keys() if str(handle.get_slice(k).get_dtype()) == "F8_E4M3"}  # noqa: SIM118
    return out


def _assert_config_names_the_files(
    directory: Path, want: torch.dtype, source: Path, model_dtype: torch.dtype
) -> None:
    """The files hold ``want``, every ``dtype`` of config.json names it, and stock transformers' load with
    ``dtype="auto"`` is its load of the source, but for the model's own rounding of the unquantized tensors
    (a bfloat16 model of an fp32 source holds them rounded; the FP8 weights keep their codes and scales)."""
    assert _stored_dtypes(directory) == {want}
    saved = json.loads((directory / "config.json").read_text())
    named = str(want).removeprefix("torch.")
    assert [saved["dtype"], *(saved[sub]["dtype"] for sub in SUB_CONFIGS)] == [named] * 3, saved
    stock = Mistral3ForConditionalGeneration.from_pretrained(directory, dtype="auto")
    reference = Mistral3ForConditionalGeneration.from_pretrained(source, dtype="auto")
    assert reference.dtype == want  # the reference itself: the source's dtype
    assert {p.dtype for p in stock.parameters()} == {want}
    state, expected = stock.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    fp8 = _fp8_keys(source)
    for key, value in expected.items():
        if legacy_name(key) not in fp8:
            value = value.to(model_dtype).to(want)
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequantized", "fp8-resident"])
@pytest.mark.parametrize(
    ("source_dtype", "model_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-source-fp32-model", "fp32-source-bf16-model"],
)
def test_a_source_save_names_the_source_dtype(
    tmp_path: Path, source_dtype: torch.dtype, model_dtype: torch.dtype, dequantize: bool
) -> None:
    source = _source(tmp_path, source_dtype)
    model = automodel_plugins.from_pretrained(source, dtype=model_dtype, dequantize=dequantize)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="source")
    _assert_config_names_the_files(tmp_path / "out", source_dtype, source, model_dtype)
    assert model.config.dtype == model_dtype  # the model's own config is left alone
    assert all(getattr(model.config, sub).dtype == model_dtype for sub in SUB_CONFIGS)


def test_an_fsdp2_source_save_names_the_source_dtype(single_rank_mesh: Any, tmp_path: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    source = _source(tmp_path, torch.bfloat16)
    model = automodel_plugins.from_pretrained(source, dtype=torch.float32)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=single_rank_mesh)
    fully_shard(model, mesh=single_rank_mesh)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="source")
    _assert_config_names_the_files(tmp_path / "out", torch.bfloat16, source, torch.float32)


@pytest.mark.parametrize("quantization", ["none", "fp8-tensor"])
def test_the_other_formats_name_the_model_dtype_they_write(tmp_path: Path, quantization: str) -> None:
    source = _source(tmp_path, torch.bfloat16)
    model = automodel_plugins.from_pretrained(source, dtype=torch.float32)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization=quantization)
    assert _stored_dtypes(tmp_path / "out") == {torch.float32}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [saved["dtype"], *(saved[sub]["dtype"] for sub in SUB_CONFIGS)] == ["float32"] * 3
    stock = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in stock.parameters()} == {torch.float32}


@pytest.mark.parametrize("to", ["bf16", "fp8-tensor"])
def test_convert_names_the_dtype_it_writes(tmp_path: Path, to: str) -> None:
    source = _source(tmp_path, torch.float32)
    automodel_plugins.convert_checkpoint(source, tmp_path / "out", to=to, progress=False)
    assert _stored_dtypes(tmp_path / "out") == {torch.bfloat16}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"
    assert all(saved[sub].get("dtype") in (None, "bfloat16") for sub in SUB_CONFIGS), saved
