"""Text-only Ministral 3 (``Ministral3ForCausalLM``, Devstral 2 123B's class) in the FSDP2 flow on 2 CPU ranks:
``build_model`` -> ``fully_shard`` each layer and the root -> ``to_empty`` -> ``load_weights``, then training."""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

SCENARIOS = ("fsdp_text_only",)


def test_sharded_load_equals_single_process_and_reads_only_its_share(distributed_run) -> None:
    ranks = distributed_run.ranks("fsdp_text_only")
    for rank, result in enumerate(ranks):
        assert result["plain_tensors"] == [], f"rank {rank}: not sharded"
        assert result["local_mismatches"] == [] and result["full_mismatches"] == [], f"rank {rank}"
        assert result["dequantized"] == 4 * 7, f"rank {rank}: every projection of the 4 layers is FP8"
        assert_reads_exactly_its_share(rank, result)
    weight_bytes = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    assert weight_bytes == ranks[0]["checkpoint_weight_bytes"]  # every weight byte read once, by one rank


def test_text_rotary_repaired_and_logits_equal(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("fsdp_text_only")):
        assert result["rotary_after_load"] == [] and result["rotary_after_forward"] == [], f"rank {rank}"
        assert result["garbled_rotary_buffers"] == 2  # the text rotary's inv_freq and original_inv_freq
        assert result["logits_equal"], f"rank {rank}"


def test_fused_loss_training_equals_single_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("fsdp_text_only")):
        assert result["losses_logits"] == [False, False], "labelled calls with skip_logits use the fused loss"
        assert result["losses"] == result["reference_losses"], f"rank {rank}"
        assert result["losses"][1] != result["losses"][0]
        assert result["updated_mismatches"] == [], f"rank {rank}"
