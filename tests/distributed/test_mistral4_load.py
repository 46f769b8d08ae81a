"""Mistral 4 (Mistral Small 4's HF form) on 2 CPU ranks under FSDP2: the fused experts with one scale per expert
(``[E, 1, 1]``) dequantized and kept FP8 (``Fp8Experts``, codes ``Shard(0)``: experts 0-1 and 2-3), and
per-expert block-FP8 pieces assembled into the fused tensors; gathered tensors, rotary buffers and logits with an
image equal the single-process load, and a source-format save of the sharded model is the source, byte for byte.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("mistral4_fsdp_per_tensor", "mistral4_fsdp_per_expert", "mistral4_fsdp_resident")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp_load_equals_single_process(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["full_mismatches"] == [] and result["rotary_mismatches"] == [], f"rank {rank}"
        # FP8-resident layers' scales are replicated buffers, by design; every parameter is sharded
        assert [n for n in result["plain_tensors"] if not n.endswith("_scale_inv")] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}: logits with an image differ"
        experts = [[0, 2], [0, 48], [0, 64]] if rank == 0 else [[2, 4], [0, 48], [0, 64]]
        assert result["expert_region"] == experts, f"rank {rank}"


def test_resident_experts_stay_fp8_under_fsdp(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("mistral4_fsdp_resident")):
        assert result["resident_experts"] == 2 and result["expert_dtype"] == "torch.uint8", f"rank {rank}"
    for scenario in ("mistral4_fsdp_per_tensor", "mistral4_fsdp_per_expert"):
        assert all(r["resident_experts"] == 0 for r in distributed_run.ranks(scenario))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_source_save_after_the_sharded_load_is_the_source(distributed_run, scenario: str) -> None:
    result = distributed_run.ranks(scenario)[0]
    assert result["save_keys_equal"] and result["save_different"] == []
