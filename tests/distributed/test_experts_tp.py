"""Expert tensor parallelism (``parallelize_experts_tp``) on 2 gloo ranks."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("etp_qwen_resident", "etp_mistral4_resident", "etp_refusals")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dump(distributed_run, scenario) -> None:
    for r in distributed_run.ranks(scenario):
        print(json.dumps({k: v for k, v in r.items() if k not in ("reads",)}, default=str)[:3000])
