"""Expert tensor parallelism (``parallelize_experts_tp``) on 2 gloo ranks."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("etp_qwen_resident", "etp_mistral4_resident", "etp_refusals")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dump(distributed_run, scenario) -> None:
    for r in distributed_run.ranks(scenario):
        print(
            {
                k: r.get(k)
                for k in (
                    "max_grad_rel_diff",
                    "worst_grad",
                    "save_error",
                    "save_different",
                    "save_keys",
                    "bytes_read",
                )
            },
            r.get("grad_names") == r.get("single_grad_names"),
        )
