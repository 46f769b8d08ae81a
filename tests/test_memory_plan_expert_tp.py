"""``plan_memory(..., tp=2, expert_tp=True)`` / ``inspect --layout tp=2 --expert-tp``: the FP8-resident experts split
over ``tp`` by the intermediate dim (``parallelize_experts_tp``), against the checkpoint's own expert bytes (headers).
Per rank against measured bytes: ``tests/distributed/test_experts_tp.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mistral_native_moe import write_mla_moe_native

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import LayoutError
from automodel_plugins.pipeline.load.memory_plan import plan_memory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mla_moe_native(tmp_path_factory.mktemp("plan-etp") / "native")


def routed_expert_code_bytes(path: Path) -> int:
    """FP8 bytes of the routed experts' weights, from the headers (not their scales, not shared experts)."""
    with Checkpoint.open(path) as opened:
        return sum(
            opened.info(key).nbytes
            for key in opened
            if ".experts." in key and "shared" not in key and opened.info(key).dtype.itemsize == 1
        )


def test_expert_tp_halves_every_ranks_expert_codes(checkpoint: Path) -> None:
    experts = routed_expert_code_bytes(checkpoint)
    assert experts > 0
    replicated = plan_memory(checkpoint, tp=2, dequantize=False)
    split = plan_memory(checkpoint, tp=2, dequantize=False, expert_tp=True)
    assert split.expert_tp and not replicated.expert_tp
    for before, after in zip(replicated.ranks, split.ranks, strict=True):
        assert before.held["fp8_codes"] - after.held["fp8_codes"] == experts // 2
        assert after.held["scales"] < before.held["scales"]  # the grids are split with the codes
        assert before.read - after.read >= experts // 2


def test_expert_tp_halves_dequantized_experts_too(checkpoint: Path) -> None:
    experts = routed_expert_code_bytes(checkpoint) * 2  # loaded in BF16
    replicated = plan_memory(checkpoint, tp=2, dtype=torch.bfloat16)
    split = plan_memory(checkpoint, tp=2, dtype=torch.bfloat16, expert_tp=True)
    for before, after in zip(replicated.ranks, split.ranks, strict=True):
        assert before.held["bfloat16"] - after.held["bfloat16"] == experts // 2


def test_expert_tp_is_without_ep(checkpoint: Path) -> None:
    with pytest.raises(LayoutError, match="expert_tp"):
        plan_memory(checkpoint, tp=2, ep=2, dequantize=False, expert_tp=True)


def test_inspect_takes_expert_tp(checkpoint: Path, run_cli) -> None:
    base = ["inspect", str(checkpoint), "--layout", "tp=2", "--fp8-resident", "--json"]
    done = run_cli(*base, "--expert-tp")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["expert_tp"] is True
    want = plan_memory(checkpoint, tp=2, dequantize=False, expert_tp=True).to_dict()
    assert plan["ranks"] == json.loads(json.dumps(want["ranks"]))
