"""The ``config.json`` a save of an FSDP2-wrapped model writes names the dtype its tensors are saved in, in the
sub-configs too (``from_pretrained(dtype="auto")`` reads each sub-model's from there), and the save leaves the
model's own config as it was. A defect: the key mapping of an FSDP2 model builds a stock stand-in on meta, and
transformers' ``_from_config`` wrote that build's bfloat16 into the live config and its sub-configs, so an fp32
model loaded from a bfloat16 checkpoint was saved with ``text_config.dtype == "bfloat16"``. One rank (gloo,
in-process); 2 ranks: tests/distributed/test_fsdp_save_dtype.py; 4 ranks, (ep, dp): test_ep_lora_fsdp.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import automodel_plugins
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_config

SUB_CONFIGS = ("text_config", "vision_config")
# A plain (never FP8) tensor of each sub-model, whose stored dtype the sub-config must name.
PLAIN_TENSOR = {
    "text_config": "model.language_model.norm.weight",
    "vision_config": "model.visual.blocks.0.norm1.weight",
}


@pytest.fixture
def single_rank_mesh() -> Any:
    """A one-rank gloo process group and CPU mesh, torn down after the test."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _stored_dtypes(directory: Path) -> dict[str, str]:
    """Tensor name -> dtype as the safetensors headers store it (``F32``, ``BF16``, ...)."""
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = str(handle.get_slice(key).get_dtype())
    return out


@pytest.mark.parametrize(
    ("source", "dtype", "stored", "named"),
    [(torch.bfloat16, torch.float32, "F32", "float32"), (torch.float32, torch.bfloat16, "BF16", "bfloat16")],
    ids=["bf16-checkpoint-fp32-model", "fp32-checkpoint-bf16-model"],
)
def test_an_fsdp2_save_names_the_saved_dtype_in_every_sub_config(
    single_rank_mesh: Any, tmp_path: Path, source: torch.dtype, dtype: torch.dtype, stored: str, named: str
) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    write_fp8_checkpoint(
        Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config()), tmp_path / "src", dtype=source
    )
    model = automodel_plugins.from_pretrained(tmp_path / "src", dtype=dtype)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=single_rank_mesh)
    fully_shard(model, mesh=single_rank_mesh)
    automodel_plugins.save_pretrained(model, tmp_path / "out", quantization="none")  # the model's dtype

    headers = _stored_dtypes(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["dtype"] == named
    for sub in SUB_CONFIGS:
        assert headers[PLAIN_TENSOR[sub]] == stored, (sub, headers[PLAIN_TENSOR[sub]])
        assert saved[sub]["dtype"] == named, (sub, saved[sub])
        assert getattr(model.config, sub).dtype == dtype, f"the save changed the model's {sub}.dtype"
    # what stock transformers reads back for dtype="auto"
    again = AutoConfig.from_pretrained(tmp_path / "out")
    assert [getattr(again, sub).dtype for sub in SUB_CONFIGS] == [dtype, dtype]
