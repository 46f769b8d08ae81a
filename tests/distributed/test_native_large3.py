"""Mistral Large 3's native form, tiny (compressed-tensors FP8_BLOCK, ``weight_scale``, per-expert
``experts.E.w1/w2/w3``, Large 3's ignore list: ``tests/mistral_native_checkpoints.write_large3_like``) on 2 CPU
ranks: FSDP2 loads (dequantized, and FP8-resident with the ``Fp8Experts`` codes sharded) and expert parallelism
equal the single-process load, and under expert parallelism each rank reads only its own experts' pieces."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

FSDP = ("native_large3_fsdp", "native_large3_fsdp_resident")
SCENARIOS = (*FSDP, "native_large3_expert_parallel")


@pytest.mark.parametrize("scenario", FSDP)
def test_fsdp_load_equals_single_process(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}: logits with an image differ"
        experts = [[0, 2], [0, 64], [0, 72]] if rank == 0 else [[2, 4], [0, 64], [0, 72]]
        assert result["expert_region"] == experts, f"rank {rank}"
        resident = scenario.endswith("resident")
        assert result["expert_dtype"] == ("torch.uint8" if resident else "torch.bfloat16"), f"rank {rank}"


def test_expert_parallel_load_reads_only_its_experts(distributed_run) -> None:
    results = distributed_run.ranks("native_large3_expert_parallel")
    for rank, result in enumerate(results):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["experts_read"] == ([0, 1] if rank == 0 else [2, 3]), f"rank {rank}"
    assert sum(r["pieces_read"] for r in results) == results[0]["pieces_total"]
