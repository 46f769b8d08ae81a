"""Expert tensor parallelism (``parallelize_experts_tp``) on 2 gloo ranks: the FP8-resident experts of a tiny
Qwen3-VL-MoE (intermediate 32 in 16x16 blocks; FP8-resident and dequantized) and a tiny Mistral 4 (intermediate 24 in 4x4 blocks, per-expert
pieces) split by the intermediate dim (every expert's gate rows, matching up rows, matching down columns, grids with
their codes), the rest by the model's tp_plan (``parallelize_fp8``); both ranks run the same batch. Against one
process holding the whole model, fp32: this rank's tensors bit for bit, what it read, the logits (grouped and eager
experts), the gradients of every non-FP8 parameter, a source-format save from every rank; and the refusals."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

LOADS = {  # scenario -> (intermediate size, MoE layers)
    "etp_qwen_resident": (32, ("0", "1")),
    "etp_mistral4_resident": (24, ("1", "2")),
    "etp_qwen_dequantized": (32, ("0", "1")),  # stock experts (BF16 weights as fp32 here): no grids
}
SCENARIOS = (*LOADS, "etp_refusals")
TOLERANCE = 1e-4
"""Relative to the largest value: fp32 sums in another order (the existing TP tests allow 2e-2)."""


@pytest.mark.parametrize("scenario", LOADS)
def test_each_rank_reads_and_holds_only_its_slice_of_every_expert(distributed_run, scenario) -> None:
    inter, layers = LOADS[scenario]
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert sorted(result["applied"]) == sorted(
            f"model.language_model.layers.{i}.mlp.experts" for i in layers
        )
        assert all(
            f"intermediate {inter // 2} of {inter} of all 4 experts" in v for v in result["applied"].values()
        )
        resident = "dequantized" not in scenario
        assert result["resident_experts"] == (2 if resident else 0)
        placements = {name.rpartition(".")[2]: p for name, p in result["expert_placements"].items()}
        grids = {"gate_up_proj_scale_inv": ["_S(1, 2)"], "down_proj_scale_inv": ["S(2)"]} if resident else {}
        assert placements == {"gate_up_proj": ["_S(1, 2)"], "down_proj": ["S(2)"], **grids}
        # the same indices of the one-process model's tensors, bit for bit (codes, grids and the rest)
        assert result["local_mismatches"] == [], f"rank {rank}"
        # every expert's pieces opened, half of their code bytes read; each piece's grid read whole
        assert result["experts_opened"] == [0, 1, 2, 3]
        assert result["expert_code_bytes_read"] * 2 == result["expert_code_bytes"], f"rank {rank}"
        assert result["expert_scale_bytes_read"] == result["expert_scale_bytes"], f"rank {rank}"
        # codes and grids (or dequantized weights) held: half of the one-process experts' (no block is cut)
        assert result["held_expert_bytes"] * 2 == result["single_expert_bytes"], f"rank {rank}"


@pytest.mark.parametrize("scenario", LOADS)
def test_the_memory_plan_matches_each_ranks_reads_and_holdings(distributed_run, scenario) -> None:
    """``plan_memory(tp=2, expert_tp=True, dequantize=False)`` from headers alone: every byte this rank read and
    holds, by kind (the experts' codes and grids halved, the attention's split by the model's tp_plan)."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["planned_held"] == result["measured_held"], rank
        assert result["planned_read"] == result["measured_read"], rank


@pytest.mark.parametrize("scenario", LOADS)
def test_logits_and_gradients_equal_one_process(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        scale = result["logits_scale"]
        assert result["logits_grouped_mm_diff"] <= TOLERANCE * scale, (rank, result["logits_grouped_mm_diff"])
        assert result["logits_eager_diff"] <= TOLERANCE * scale, (rank, result["logits_eager_diff"])
        assert result["grad_names"] == result["single_grad_names"] and result["grad_names"]
        experts = [
            n for n in result["grad_names"] if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
        ]
        assert len(experts) == (4 if "dequantized" in scenario else 0)  # each rank's slices, as DTensors
        # every gradient whole on every rank, Qwen's per-head q_norm / k_norm (replicated, applied to this
        # rank's heads by the attention's tp_plan split) included: parallelize_fp8 sums theirs
        assert result["max_grad_rel_diff"] <= TOLERANCE, (rank, result["worst_grad"])


@pytest.mark.parametrize("scenario", LOADS)
def test_a_source_save_from_every_rank_is_byte_identical_to_the_source(distributed_run, scenario) -> None:
    ranks = distributed_run.ranks(scenario)
    assert [r["save_error"] for r in ranks] == [None, None]
    assert ranks[0]["save_different"] == [] and ranks[0]["save_keys"] > 0


def test_splits_it_cannot_take_are_refused_naming_the_tensor_or_module(distributed_run) -> None:
    for result in distributed_run.ranks("etp_refusals"):
        cut = result["block_cut"]
        assert cut is not None and "layers.1.mlp.experts.gate_up_proj" in cut and "(8, 8)" in cut, cut
        assert result["block_cut_untouched"], "a refused split changes nothing"
        lora = result["lora"]
        assert lora is not None and "layers.0.mlp.experts" in lora and "parallelize_experts" in lora, lora
        late = result["lora_after"]  # PEFT applied after the split: its first forward
        assert late is not None and "Fp8Experts" in late and "parallelize_experts" in late, late
        dequantized = result["dequantized_lora"]  # stock PEFT's ParamWrapper on dequantized experts
        assert dequantized is not None and "layers.0.mlp.experts" in dequantized, dequantized
