"""2 CPU ranks, FSDP2: an FP8-resident compressed-tensors model's state dict goes through
``torch.distributed.checkpoint`` in compressed-tensors' names (``weight_scale`` ``[1]`` or the grid,
``input_scale`` ``[1]``) and comes back as the source's codes and scales, bit for bit (see ``_ct_state_dict.py``;
one rank in-process: tests/test_compressed_tensors_state_dict.py)."""

from __future__ import annotations

import pytest

from ._ct_state_dict import SCENARIOS as WORKER_SCENARIOS

pytestmark = pytest.mark.distributed

SCENARIOS = tuple(WORKER_SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dcp_round_trip_in_compressed_tensors_names(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        keys = result["keys"]
        assert any(k.endswith(".weight_scale") for k in keys), f"rank {rank}"
        assert not any(k.endswith(("weight_scale_inv", "activation_scale")) for k in keys), f"rank {rank}"
        assert ("input_scale" in "".join(keys)) == scenario.endswith("static"), f"rank {rank}"
        assert result["sharded_codes"] > 0, f"rank {rank}: the codes are not sharded"
        assert result["checked"] > 0 and result["mismatches"] == [], (
            f"rank {rank}: {result['mismatches'][:5]}"
        )
