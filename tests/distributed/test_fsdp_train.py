"""Training with FSDP2 and the fused linear cross-entropy: ``lm_head`` is managed by the root FSDP unit,
sharded at rest and unsharded during the forward, where the fused loss reads its weight."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("train",)


def test_fused_loss_and_update_match_single_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("train")):
        assert result["head_sharded_at_rest"], f"rank {rank}: lm_head.weight should be an FSDP2 DTensor"
        assert result["losses_logits"] == [False, False], (
            "labelled calls with skip_logits must use the fused loss"
        )
        assert result["losses"] == result["reference_losses"], f"rank {rank}"
        assert result["losses"][1] != result["losses"][0], "the step must change the loss"
        assert "lm_head.weight" in result["params_changed"]
        assert result["updated_mismatches"] == [], f"rank {rank}: updated parameters differ"


def test_head_in_a_unit_of_its_own_falls_back_to_the_stock_loss_with_a_warning(distributed_run) -> None:
    """Its weight is unsharded only in ``lm_head``'s own pre-hook: the fused loss would read a shard."""
    for rank, result in enumerate(distributed_run.ranks("train")):
        head = result["own_unit_head"]
        assert any("forward hooks" in message for message in head["warnings"]), f"rank {rank}: {head}"
        assert head["had_logits"], "the stock forward returns logits"
        assert abs(head["loss"] - head["reference_loss"]) <= 1e-5, f"rank {rank}: {head}"
