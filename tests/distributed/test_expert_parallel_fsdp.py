"""Expert parallelism combined with FSDP2 on a 2-D mesh, 4 gloo ranks: ``(ep=2, dp=2)``, the Qwen3-VL-MoE
experts split by expert over ``ep`` (``parallelize_experts``) and FSDP2-sharded over ``dp`` (one expert of 4 a
rank), every decoder layer and the root HSDP over the mesh (sharded over dp, replicated over ep), FP8-resident
and dequantized. Against one process: gathered tensors bit for bit, the loss and FSDP2's averaged gradients on
the mean of the 4 ranks' batches; reads by share; the memory plan (``fsdp=2, ep=2``) against each rank."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed

FOUR = 4
SCENARIOS_4 = ("ep_fsdp_qwen_resident", "ep_fsdp_qwen_dequantized")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    """Its own launch of 4 ranks (2 CPU cores suffice)."""
    import torch.distributed as dist

    from .conftest import launch

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ep-four-ranks")
    run = launch(list(SCENARIOS_4), out, nproc=FOUR)
    results = {}
    for scenario in SCENARIOS_4:
        for rank in range(FOUR):
            path = out / "results" / f"{scenario}.rank{rank}.json"
            if not path.is_file():
                pytest.fail(f"rank {rank} wrote no result for {scenario!r}:\n{run.log_tail()}")
            results[scenario, rank] = json.loads(path.read_text())
            assert "error" not in results[scenario, rank], results[scenario, rank]["error"]
    return results


@pytest.mark.parametrize("scenario", SCENARIOS_4)
def test_gathered_tensors_loss_and_gradients_equal_one_process(four_ranks, scenario) -> None:
    for rank in range(FOUR):
        result = four_ranks[scenario, rank]
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["grad_names"] == result["single_grad_names"] and result["grad_names"]
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]
        if scenario.endswith("dequantized"):  # split over ep, then over dp: a quarter of the experts a rank
            assert result["held_expert_bytes"] * FOUR == result["single_expert_bytes"], rank


@pytest.mark.parametrize("scenario", SCENARIOS_4)
def test_each_rank_reads_a_quarter_of_the_expert_codes(four_ranks, scenario) -> None:
    for rank in range(FOUR):
        result = four_ranks[scenario, rank]
        ep, dp = result["ep"], result["dp"]
        assert result["expert_code_bytes_read"] * FOUR == result["expert_code_bytes"], rank
        if scenario.endswith("dequantized"):  # the scale of each piece read, its piece only
            assert result["experts_opened"] == [2 * ep + dp]
        else:  # the FP8 codes of one expert; the grids of the EP shard's two (each rank's forward needs both)
            assert result["experts_opened"] == [2 * ep, 2 * ep + 1]
            assert result["expert_scale_bytes_read"] * 2 == result["expert_scale_bytes"]


@pytest.mark.parametrize("scenario", SCENARIOS_4)
def test_the_memory_plan_matches_each_rank_on_the_2d_mesh(four_ranks, scenario) -> None:
    for rank in range(FOUR):
        result = four_ranks[scenario, rank]
        planned, measured = result["planned_held"], result["measured_held"]
        assert set(planned) == set(measured)
        for kind, nbytes in planned.items():
            assert abs(nbytes - measured[kind]) <= 0.1 * measured[kind], (rank, kind, planned, measured)
        assert abs(result["planned_read"] - result["measured_read"]) <= 0.1 * result["measured_read"]
