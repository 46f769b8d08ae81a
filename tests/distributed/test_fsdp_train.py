"""Training with FSDP2 and the fused linear cross-entropy: ``lm_head`` is managed by the root FSDP unit,
sharded at rest and unsharded during the forward, where the fused loss reads its weight. ``lm_head`` in an FSDP2
unit of its own (accelerate's layout and others): ``test_accelerate_fsdp2.py``."""

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
