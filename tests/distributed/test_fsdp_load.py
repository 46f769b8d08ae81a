"""FSDP2-sharded loads (2 CPU ranks, gloo) of per-tensor and block-FP8 checkpoints, the issue's flow::

model = build_model(path); fully_shard(each layer); fully_shard(model); model.to_empty(device="cpu")
load_weights(model, path)
"""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share, fp8_weight_regions

pytestmark = pytest.mark.distributed

SCENARIOS = ("fsdp_per_tensor", "fsdp_block")


def test_launch_exits_cleanly(distributed_run) -> None:
    assert distributed_run.returncode == 0, distributed_run.log_tail()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gathered_state_dict_is_bit_identical_to_single_process(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["plain_tensors"] == [], f"rank {rank}: not sharded"
        assert result["local_mismatches"] == [], f"rank {rank}: local shards differ"
        assert result["full_mismatches"] == [], f"rank {rank}: gathered tensors differ"
        assert "model.language_model.norm.weight" in result["uneven"]  # 67 rows: 34 + 33


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_reads_only_its_shard(distributed_run, scenario: str) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert_reads_exactly_its_share(rank, result)
    # Together the ranks read every weight byte once (only the small scales are read by both).
    weight_bytes = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    assert weight_bytes == ranks[0]["checkpoint_weight_bytes"]


def test_block_shards_need_not_be_block_aligned(distributed_run) -> None:
    """Rank 1's 36 of 72 rows (gate/up) and 33 of 67 rows (o/down) start inside a 16-row block."""
    regions = fp8_weight_regions(distributed_run.ranks("fsdp_block")[1])
    starts = {key.rsplit(".", 2)[-2]: bounds[0][0] for key, bounds in regions.items() if bounds}
    assert starts == {
        "gate_proj": 36,
        "up_proj": 36,
        "o_proj": 34,
        "down_proj": 34,
        "q_proj": 32,
        "k_proj": 16,
        "v_proj": 16,
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rotary_repaired_eagerly_and_by_the_first_forward(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["rotary_after_load"] == [], f"rank {rank}: load_weights left rotary buffers wrong"
        assert result["garbled_rotary_buffers"] == 4
        assert result["rotary_after_forward"] == [], f"rank {rank}: the first forward did not repair them"
        assert result["logits_equal"], f"rank {rank}: logits differ from the single-process model"
