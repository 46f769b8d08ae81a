"""2 ranks save an fp32 FSDP2 model loaded from a bfloat16 FP8 checkpoint with ``quantization="source"``: the
files hold BF16 (the source's dtype), ``config.json`` names bfloat16 at the top and in ``text_config`` /
``vision_config``, and stock transformers' ``from_pretrained(dtype="auto")`` loads it as it loads the source.
Before the fix it said float32 (the model's). One process and one rank in-process: tests/test_save_config_dtype.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ._source_save_dtype import SCENARIOS as WORKER_SCENARIOS

pytestmark = pytest.mark.distributed

SCENARIOS = tuple(WORKER_SCENARIOS)


def test_an_fsdp2_source_save_names_the_source_dtype(distributed_run) -> None:
    from transformers import AutoModelForImageTextToText

    ranks = distributed_run.ranks("fsdp_source_save_dtype")
    assert all(r["held"] == "torch.float32" for r in ranks)
    assert all(share > 0 for share in ranks[0]["written_by_rank"])
    folder = distributed_run.out / ranks[0]["folder"]
    source = distributed_run.out / f"ckpt-{ranks[0]['source']}"
    stored = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            stored |= {
                str(handle.get_slice(key).get_dtype())
                for key in handle.keys()  # noqa: SIM118 - safe_open is not a mapping
                if not key.endswith(("weight_scale_inv", "activation_scale"))
            }
    assert stored - {"F8_E4M3"} == {"BF16"}
    saved = json.loads((folder / "config.json").read_text())
    assert [saved["dtype"], saved["text_config"]["dtype"], saved["vision_config"]["dtype"]] == [
        "bfloat16"
    ] * 3
    stock = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
    reference = AutoModelForImageTextToText.from_pretrained(source, dtype="auto")
    assert reference.dtype == torch.bfloat16 and {p.dtype for p in stock.parameters()} == {torch.bfloat16}
    state, expected = stock.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
