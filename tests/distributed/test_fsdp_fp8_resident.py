"""FP8-resident layers (``dequantize=False``) under FSDP2, 2 CPU ranks on gloo::

    model = build_model(path, dequantize=False)   # Fp8Linear layers on meta
    model = peft.get_peft_model(model, lora)       # optional: adapters on meta, sharded with the rest
    fully_shard(a down_proj alone); fully_shard(each layer); fully_shard(model); model.to_empty(device="cpu")
    load_weights(model, path)                      # each rank reads its slice of the FP8 codes, every scale whole

One ``down_proj`` is an FSDP2 unit of its own: it holds nothing but FP8 codes, which gloo could not all-gather
as float8 (it can as the uint8 bytes ``Fp8Linear`` stores), under a ``MixedPrecisionPolicy(param_dtype=bf16)``
that would cast float8 codes to BF16 (it leaves uint8 alone: the logits stay exact).
"""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

LOADS = ("fsdp_resident_per_tensor", "fsdp_resident_block")
SCENARIOS = (*LOADS, "fsdp_resident_lora")
ADAPTERS = 2 * (4 * 7 + 2 * 7 + 1)
"""LoRA A and B on 4 text layers x 7 FP8 projections, 2 vision layers x 7 (BF16), and the projector."""


@pytest.mark.parametrize("scenario", LOADS)
def test_each_rank_reads_and_holds_only_its_slice_of_the_fp8_codes(distributed_run, scenario: str) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["kept_fp8"] == 28 and result["dequantized"] == 0, f"rank {rank}"
        assert len(result["fp8_resident"]) == 28
        assert result["codes_dtype"] == "torch.uint8"
        assert_reads_exactly_its_share(rank, result)
    held = [r["codes_held"] for r in ranks]
    assert sum(held) == ranks[0]["codes_total"] and max(held) <= ranks[0]["codes_total"] // 2 + 4 * 72
    weight_bytes = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    assert weight_bytes == ranks[0]["checkpoint_weight_bytes"]  # every code byte read once, by one rank


@pytest.mark.parametrize("scenario", LOADS)
def test_gathered_codes_and_scales_and_the_logits_equal_the_single_process_load(
    distributed_run, scenario: str
) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}"


def test_a_lora_step_on_two_ranks_equals_one_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("fsdp_resident_lora")):
        assert result["lora_sharded"], f"rank {rank}: the adapters should be FSDP2 DTensors too"
        assert result["trainable"] and all("lora_" in name for name in result["trainable"])
        assert result["grad_names"] == result["single_grad_names"] and len(result["grad_names"]) == ADAPTERS
        single, sharded = result["single_losses"], result["losses"]
        assert abs(sharded[0] - single[0]) <= 1e-6 and abs(sharded[1] - single[1]) <= 1e-6, (sharded, single)
        assert single[1] != single[0], "the step must change the loss"
        assert result["max_grad_diff"] <= 1e-6 and result["max_param_diff"] <= 1e-6, result
        # The whole batch in one process: the same loss, and gradients up to fp32 summation order.
        assert abs(result["whole_losses"][0] - single[0]) <= 1e-6, (result["whole_losses"], single)
        assert result["max_whole_grad_diff"] <= 1e-6, result
        assert result["codes_held"] * 2 <= result["codes_total"] + 4 * 72 * 16, f"rank {rank}"
