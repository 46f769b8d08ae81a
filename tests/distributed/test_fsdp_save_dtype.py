"""2 ranks save an FSDP2 model (plain, and after ``merge_lora``) with ``quantization="none"``: ``config.json``
names the dtype of the tensors written (read from the safetensors headers) at the top and in ``text_config``
and ``vision_config``, stock ``AutoConfig`` reads that back, and the save left the model's own config alone.
Before the fix the fp32 saves named bfloat16 in the sub-configs. One rank in-process: tests/test_fsdp_save_config.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ._fsdp_save_config import SCENARIOS as WORKER_SCENARIOS

pytestmark = pytest.mark.distributed

SCENARIOS = tuple(WORKER_SCENARIOS)
SUB_CONFIGS = ("text_config", "vision_config")
NAMED = {"F32": "float32", "BF16": "bfloat16"}


def _stored(directory: Path) -> set[str]:
    """The dtypes of the floating-point tensors written (``F32``, ``BF16``; FP8 codes and scales aside)."""
    out = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            out |= {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}  # noqa: SIM118
    return out - {"F8_E4M3"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_saved_config_names_the_saved_dtype_everywhere(distributed_run, scenario: str) -> None:
    from transformers import AutoConfig

    want = "float32" if "fp32" in scenario else "bfloat16"
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["held"] == {sub: f"torch.{want}" for sub in SUB_CONFIGS}, f"rank {rank}"
    folder = distributed_run.out / distributed_run.ranks(scenario)[0]["folder"]
    assert {NAMED[d] for d in _stored(folder)} == {want}
    saved = json.loads((folder / "config.json").read_text())
    assert [saved["dtype"], *(saved[sub]["dtype"] for sub in SUB_CONFIGS)] == [want] * 3, saved
    again = AutoConfig.from_pretrained(folder)
    assert [getattr(again, sub).dtype for sub in SUB_CONFIGS] == [getattr(torch, want)] * 2
