"""Tensor parallelism of FP8-resident layers (``dequantize=False``), 2 CPU ranks on gloo::

    model = build_model(path, dequantize=False)     # Fp8Linear layers on meta
    model = peft.get_peft_model(model, lora)         # optional: LoRA on q_proj / v_proj
    parallelize_fp8(model, mesh)                     # the model's tp_plan: q/k/v/gate/up colwise, o/down rowwise
    model.to_empty(device="cpu"); load_weights(model, path)

Three checkpoints: per-tensor scales (replicated), 4x4 blocks (every shard boundary on a block boundary) and
16x16 blocks, whose boundaries the MLP's split cuts (gate/up rows and down columns split 36 + 36: rank 1 starts
inside block 2); each rank holds the whole grid, so the cut is handled exactly.
"""

from __future__ import annotations

import pytest

from ._expect import assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

LOADS = ("tp_resident_per_tensor", "tp_resident_block_aligned", "tp_resident_block_cut")
SCENARIOS = (*LOADS, "tp_resident_lora")
LORA = 2 * 2 * (4 + 2)
"""LoRA A and B on q_proj and v_proj of 4 text layers (split) and 2 vision layers (not in the plan: replicated)."""


@pytest.mark.parametrize("scenario", LOADS)
def test_each_rank_reads_and_holds_only_its_rows_or_columns_of_the_codes(distributed_run, scenario) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["kept_fp8"] == 28 and result["fp8_resident"] == 28, f"rank {rank}"
        assert result["placements"] == {
            "model.language_model.layers.1.self_attn.q_proj": ["Shard(dim=0)"],
            "model.language_model.layers.1.mlp.up_proj": ["Shard(dim=0)"],
            "model.language_model.layers.1.mlp.down_proj": ["Shard(dim=1)"],
        }
        assert_reads_exactly_its_share(rank, result)
    held = [r["codes_held"] for r in ranks]
    assert sum(held) == ranks[0]["codes_total"] and max(held) == ranks[0]["codes_total"] // 2
    weight_bytes = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    # Every FP8 code byte read once, by one rank (the BF16 vision tower, projector, embeddings and norms,
    # replicated, are read by both).
    assert weight_bytes < 2 * ranks[0]["checkpoint_weight_bytes"]


@pytest.mark.parametrize("scenario", LOADS)
def test_gathered_codes_and_the_logits_equal_one_process(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["full_mismatches"] == [], f"rank {rank}"
        # The same split of the dequantized model (stock nn.Linear under DTensor) computes the same bits.
        assert result["logits_equal_tp_dequantized"], f"rank {rank}"
        # One process sums each row-wise product in one go, not as two partial sums: rounding apart, equal.
        assert result["logits_max_diff_single"] <= 2e-2 * result["logits_max_abs"], result


def test_a_lora_step_on_q_and_v_over_split_fp8_layers_equals_one_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("tp_resident_lora")):
        assert result["trainable"] and all("lora_" in name for name in result["trainable"]), f"rank {rank}"
        assert len(result["lora_b_sharded"]) == 2 * 4, "lora_B is split by rows with its base layer"
        assert all(".language_model." in name for name in result["lora_b_sharded"])
        assert result["grad_names"] == result["single_grad_names"] and len(result["grad_names"]) == LORA
        # The same split and LoRA over the dequantized model (stock nn.Linear bases): the same bits.
        assert result["equal_to_split_dequantized"], f"rank {rank}"
        single, split = result["single_losses"], result["losses"]
        assert single[1] != single[0], "the step must change the loss"
        assert abs(split[0] - single[0]) <= 1e-3 and abs(split[1] - single[1]) <= 1e-3, (split, single)
        assert result["max_grad_diff"] <= 2e-2 * result["max_grad"], result
        assert result["codes_held"] * 2 == result["codes_total"], f"rank {rank}"
