"""Expert parallelism in one process: which modules ``parallelize_experts`` splits (the model's own ``ep_plan``),
and ``plan_memory`` / ``inspect --layout ep=N`` on a header-only MoE checkpoint: FP8-resident experts' codes and
scale grids held (and read) by EP shard, an expert count the EP degree does not divide refused by name. (The
distributed flow, measured: ``tests/distributed/test_expert_parallel*.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import automodel_plugins
from automodel_plugins.errors import LayoutError
from automodel_plugins.testing.header_only import write_header_only_checkpoint
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

NOT_CONVERTED = ("model.visual", "lm_head", "model.language_model.layers.0.mlp.gate")
SIZES = {"hidden_size": 48, "moe_intermediate_size": 32, "vocab_size": 251, "num_hidden_layers": 1}


def moe_checkpoint(directory: Path, experts: int) -> Path:
    config = tiny_qwen3_vl_moe_config(**SIZES, num_experts=experts)
    write_header_only_checkpoint(
        config, directory, block_size=(16, 16), modules_to_not_convert=NOT_CONVERTED, activation_scale=False
    )
    return directory


@pytest.fixture(scope="module")
def four_experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moe_checkpoint(tmp_path_factory.mktemp("ep") / "four", 4)


def test_the_experts_modules_come_from_the_models_ep_plan(four_experts: Path) -> None:
    """transformers' ``base_model_ep_plan`` names ``layers.*.mlp.experts`` ``ep_dispatch_experts``; the resident
    build's ``Fp8Experts`` stand at those names (and nothing else matches)."""
    from automodel_plugins.model.fp8_experts import Fp8Experts

    for dequantize in (True, False):
        model = automodel_plugins.build_model(four_experts, dequantize=dequantize)
        found = automodel_plugins.expert_parallel_plan(model)
        assert list(found) == ["model.language_model.layers.0.mlp.experts"]
        assert isinstance(next(iter(found.values())), Fp8Experts) is (not dequantize)


def test_a_model_without_an_ep_plan_is_searched_for_fused_experts(four_experts: Path) -> None:
    model = automodel_plugins.build_model(four_experts, dequantize=False)
    model._ep_plan = {}  # what transformers' ep_plan property returns
    assert not model.ep_plan
    assert list(automodel_plugins.expert_parallel_plan(model)) == [
        "model.language_model.layers.0.mlp.experts"
    ]


def test_resident_experts_hold_and_read_their_ep_shard_of_codes_and_grids(four_experts: Path) -> None:
    whole = automodel_plugins.plan_memory(four_experts, dequantize=False).ranks[0]
    plan = automodel_plugins.plan_memory(four_experts, dequantize=False, ep=2)
    codes = 4 * (64 * 48 + 48 * 32)  # the experts' FP8 bytes; the attention's FP8 codes are replicated
    grids = 4 * (4 * 3 + 3 * 2) * 4  # fp32, one 16x16 grid an expert and projection
    for rank in plan.ranks:
        assert whole.held["fp8_codes"] - rank.held["fp8_codes"] == codes // 2
        assert whole.held["scales"] - rank.held["scales"] == grids // 2
    # each rank reads half the experts' pieces with their scales (gate, up 2x3 cells, down 3x2; fp32)
    piece_scales = 4 * (2 * 3 + 2 * 3 + 3 * 2) * 4
    assert {whole.read - rank.read for rank in plan.ranks} == {codes // 2 + piece_scales // 2}


def test_an_expert_count_the_ep_degree_does_not_divide_is_refused_by_name(tmp_path: Path) -> None:
    path = moe_checkpoint(tmp_path / "five", 5)
    with pytest.raises(
        LayoutError, match=r"ep=2: model\.language_model\.layers\.0\.mlp\.experts has 5 experts"
    ):
        automodel_plugins.plan_memory(path, ep=2)


def test_inspect_layout_with_an_ep_degree(four_experts: Path, run_cli) -> None:
    result = run_cli("inspect", str(four_experts), "--layout", "fsdp=2,ep=2", "--fp8-resident", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["layout"] == {"fsdp": 2, "ep": 2, "tp": 1} and len(plan["ranks"]) == 4
    assert torch.tensor([r["held"]["scales"] for r in plan["ranks"]]).unique().numel() == 1
