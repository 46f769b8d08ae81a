"""Tensor-parallel layout (``distribute_tensor``): projections Shard(0) / Shard(1) (uneven, not block-aligned
in odd layers), embeddings and head Shard(0) over an odd vocabulary, everything else Replicate."""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share, fp8_weight_regions

pytestmark = pytest.mark.distributed

SCENARIOS = ("tp_per_tensor", "tp_block")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_shard_is_exact(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["placements"] == ["Replicate()", "Shard(dim=0)", "Shard(dim=1)"]
        assert result["local_mismatches"] == [], f"rank {rank}: local shards differ"
        assert result["full_mismatches"] == [], f"rank {rank}: gathered tensors differ"
        assert result["rotary_after_load"] == [], f"rank {rank}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_reads_only_its_shard(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert_reads_exactly_its_share(rank, result)


def test_column_shards_of_block_fp8_weights_are_uneven_and_unaligned(distributed_run) -> None:
    """Odd layers shard q/k/v/gate/up by input column: 67 columns split 34 + 33, rank 1 starting at 34."""
    regions = fp8_weight_regions(distributed_run.ranks("tp_block")[1])
    column_starts = {
        key: bounds[1][0]
        for key, bounds in regions.items()
        if bounds and ".layers.1." in key and bounds[0] == [0, bounds[0][1]] and bounds[1][0] > 0
    }
    assert {key.rsplit(".", 2)[-2] for key in column_starts} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "gate_proj",
        "up_proj",
    }
    assert set(column_starts.values()) == {34}
