"""``plan_memory`` (headers only) against what each of 2 gloo ranks reads and holds after the load it plans:
FP8-resident with LoRA (r=4, q/v), under FSDP2 and under tensor parallelism."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("plan_fsdp", "plan_tp")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_plan_matches_each_ranks_reads_and_holdings_within_10_percent(distributed_run, scenario) -> None:
    """The bar is 10%; the plan uses the loader's own placement code, so it is exact here (asserted apart)."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        measured, planned = result["measured_held"], result["planned_held"]
        assert set(planned) == set(measured) - {"lora"}, (rank, planned, measured)
        for kind, nbytes in planned.items():
            assert abs(nbytes - measured[kind]) <= 0.1 * measured[kind], (rank, kind, planned, measured)
        assert abs(result["planned_read"] - result["measured_read"]) <= 0.1 * result["measured_read"], result
        assert abs(result["planned_lora_params"] - measured["lora"]) <= 0.1 * measured["lora"], (rank, result)
        # Reported per rank, worst and total.
        plan = result["plan"]
        assert plan["world_size"] == 2 and len(plan["ranks"]) == 2
        assert plan["worst_rank"]["total"] == max(r["total"] for r in plan["ranks"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_plan_is_exact_on_the_tiny_checkpoint(distributed_run, scenario) -> None:
    for result in distributed_run.ranks(scenario):
        assert result["planned_read"] == result["measured_read"]
        assert {**result["planned_held"], "lora": result["planned_lora_params"]} == result["measured_held"]


FOUR = 4


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Its own launch: the plan scenarios on 4 gloo ranks (2 CPU cores suffice; slower)."""
    import json

    import torch.distributed as dist

    from .conftest import launch

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("four-ranks")
    run = launch(list(SCENARIOS), out, nproc=FOUR)
    results = {}
    for scenario in SCENARIOS:
        for rank in range(FOUR):
            path = out / "results" / f"{scenario}.rank{rank}.json"
            if not path.is_file():
                pytest.fail(f"rank {rank} wrote no result for {scenario!r}:\n{run.log_tail()}")
            results[scenario, rank] = json.loads(path.read_text())
            assert "error" not in results[scenario, rank], results[scenario, rank]["error"]
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_plan_is_exact_on_four_ranks(four_ranks, scenario) -> None:
    for rank in range(FOUR):
        result = four_ranks[scenario, rank]
        assert result["plan"]["world_size"] == FOUR
        assert result["planned_read"] == result["measured_read"], rank
        assert {**result["planned_held"], "lora": result["planned_lora_params"]} == result["measured_held"], (
            rank
        )
