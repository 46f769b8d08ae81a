"""``merge_lora`` on an FSDP2-sharded FP8-resident model with LoRA on q_proj and v_proj only, 2 CPU ranks on gloo:
every rank's merged model has ``quantization_config.modules_to_not_convert`` = the declared list plus exactly
the merged layers (module order), and every other FP8 layer stays an ``Fp8Linear``, so a save of it is read as
it is. The single-process paths are in ``tests/test_peft_merge_config.py``."""

from __future__ import annotations

import pytest

from ._peft_merge_config import SCENARIOS as WORKER_SCENARIOS
from ._peft_merge_config import TARGETS
from ._tiny import MODULES_TO_NOT_CONVERT, TEXT

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:.*partial:UserWarning")]

SCENARIOS = tuple(WORKER_SCENARIOS)
LAYERS = [f"model.language_model.layers.{i}" for i in range(TEXT["num_hidden_layers"])]
MERGED = [f"{layer}.self_attn.{p}" for layer in LAYERS for p in TARGETS]
KEPT = [
    f"{layer}.{p}"
    for layer in LAYERS
    for p in ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_sharded_merge_lists_exactly_the_merged_layers(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["modules_to_not_convert"] == [*MODULES_TO_NOT_CONVERT, *MERGED], f"rank {rank}"
        assert result["merged_sharded"] == MERGED, f"rank {rank}"
        assert sorted(result["fp8_left"]) == sorted(KEPT), f"rank {rank}"
