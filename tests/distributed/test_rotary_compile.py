"""FSDP2 on meta, ``to_empty``, the user's own ``set_model_state_dict``, then the first call compiled: the rotary
buffers are repaired by ``to_empty`` itself (each rotary module's ``_apply``), so the compiled call has no graph
break in the rotary repair and equals one process's load."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("fsdp_rotary_compile",)


def test_rotary_is_right_from_to_empty_and_the_first_compiled_call_does_not_break(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("fsdp_rotary_compile")):
        assert result["rotary_after_to_empty"] == [], f"rank {rank}: to_empty left them garbage"
        assert result["rotary_breaks"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}"
        assert result["rotary_after_forward"] == [], f"rank {rank}"
