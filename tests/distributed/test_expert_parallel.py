"""Expert parallelism (``parallelize_experts``) on 2 gloo ranks, experts 0-1 and 2-3 of 4 (``Shard(0)``), every rank
its own batch (tokens reach the experts' ranks by transformers' all-to-all), FP8-resident experts (``Fp8Experts``)
and dequantized ones, on a Qwen3-VL-MoE checkpoint (per-expert block pieces), Mistral 4's HF forms (fused with one
scale per expert; per-expert block pieces) and a Mistral-native MoE checkpoint. Against one process holding the
whole model on both batches, fp32: this rank's tensors bit for bit, logits on its batch, the gradients of a step
on the mean of the ranks' losses (experts' too where dequantized) and the loss after an SGD step; what each rank
read against its experts' share; a source-format save against the source bytes; the memory plan against what each
rank read and holds."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

RESIDENT = (
    "ep_qwen_resident",
    "ep_mistral4_fused_resident",
    "ep_mistral4_pieces_resident",
    "ep_native_resident",
)
DEQUANTIZED = ("ep_qwen_dequantized", "ep_mistral4_pieces_dequantized", "ep_native_dequantized")
FUSED = ("ep_mistral4_fused_resident",)
LORA = ("ep_qwen_resident_lora", "ep_native_resident_lora")
SCENARIOS = (*RESIDENT, *DEQUANTIZED, *LORA, "ep_refusals", "ep_hsdp_qwen_dequantized", "ep_shared_batch")
LAYERS = 2  # MoE layers of every checkpoint here (Mistral 4: layer 0 dense, 1-2 MoE)


@pytest.mark.parametrize("scenario", RESIDENT + DEQUANTIZED)
def test_each_rank_holds_exactly_its_experts_equal_to_one_process(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert len(result["applied"]) == LAYERS and all(
            "2 of 4 experts" in v for v in result["applied"].values()
        )
        assert result["local_mismatches"] == [], f"rank {rank}"
        assert result["resident_experts"] == (LAYERS if scenario in RESIDENT else 0)
        regions = result["expert_regions"]
        assert regions and all(bounds[0] == [2 * rank, 2 * rank + 2] for bounds in regions.values()), regions
        assert result["held_expert_bytes"] * 2 == result["single_expert_bytes"], f"rank {rank}"


@pytest.mark.parametrize("scenario", RESIDENT + DEQUANTIZED)
def test_each_rank_reads_its_experts_share_of_codes_and_scales(distributed_run, scenario) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["expert_code_bytes_read"] * 2 == result["expert_code_bytes"], f"rank {rank}"
        assert result["expert_scale_bytes_read"] * 2 == result["expert_scale_bytes"], f"rank {rank}"
        if (
            scenario in FUSED
        ):  # one [E, ...] tensor and [E, 1, 1] scale a projection: this rank's rows of both
            assert result["experts_opened"] == []
        else:  # one tensor an expert: only this rank's experts' pieces are opened, grids included
            assert result["experts_opened"] == [2 * rank, 2 * rank + 1]


@pytest.mark.parametrize("scenario", RESIDENT + DEQUANTIZED)
def test_logits_and_gradients_equal_one_process(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        for implementation in ("logits_max_diff", "eager_logits_max_diff"):  # grouped_mm, eager
            assert result[implementation] <= 1e-6 * result["logits_scale"], (rank, implementation, result)
        assert result["grad_names"] == result["single_grad_names"] and result["grad_names"], f"rank {rank}"
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * abs(result["single_loss"])
        # routing's gradient reaches the routers through the combine: a router weight trains
        assert any(n.endswith("mlp.gate.weight") for n in result["grad_names"])
        if scenario in RESIDENT:
            assert result["expert_grads"] == 0  # FP8 codes stay frozen
        else:
            assert result["expert_grads"] == 2 * LAYERS
            assert (
                abs(result["loss_after"] - result["single_loss_after"]) <= 1e-5 * result["single_loss_after"]
            )
            assert result["loss_after"] < result["loss"] - 0.1, "the step must move the loss"


@pytest.mark.parametrize("scenario", RESIDENT + DEQUANTIZED)
def test_the_memory_plan_matches_each_ranks_reads_and_holdings(distributed_run, scenario) -> None:
    """Within 10% (the bar); exact here, the plan using the loader's own placement code."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        planned, measured = result["planned_held"], result["measured_held"]
        assert set(planned) == set(measured), (rank, planned, measured)
        for kind, nbytes in planned.items():
            assert abs(nbytes - measured[kind]) <= 0.1 * measured[kind], (rank, kind, planned, measured)
        assert abs(result["planned_read"] - result["measured_read"]) <= 0.1 * result["measured_read"]
        assert planned == measured and result["planned_read"] == result["measured_read"], rank


@pytest.mark.parametrize("scenario", RESIDENT + DEQUANTIZED)
def test_a_source_save_from_every_rank_is_the_source_checkpoint(distributed_run, scenario) -> None:
    """Right after the expert-parallel load: each rank writes its experts (FP8-resident ones from their local
    grids), and the files hold the source checkpoint's bytes, every tensor."""
    ranks = distributed_run.ranks(scenario)
    assert [r["save_error"] for r in ranks] == [None, None], [r["save_error"] for r in ranks]
    assert ranks[0]["save_keys"] > 0 and ranks[0]["save_different"] == []


@pytest.mark.parametrize("scenario", LORA)
def test_a_lora_step_on_the_attention_over_split_fp8_experts_equals_one_process(
    distributed_run, scenario
) -> None:
    """PEFT first (on meta), then ``parallelize_experts`` (the experts found under the PEFT model); the adapters'
    gradients come back through the dispatched ``Fp8Experts`` of the later layer."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert all(name.startswith("base_model.model.") for name in result["applied"]), result["applied"]
        assert result["grad_names"] == result["single_grad_names"]
        assert result["grad_names"] and all("lora_" in n for n in result["grad_names"])
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]
        assert abs(result["loss_after"] - result["single_loss_after"]) <= 1e-5 * result["single_loss_after"]
        assert result["loss_after"] < result["loss"], "the step must move the loss"


def test_ranks_sharing_one_batch_run_transformers_all_reduce_and_sliced_all_to_all(distributed_run) -> None:
    """``tp_mesh`` = the EP mesh (every rank the same batch, as under tensor parallelism): inference takes
    ``AutoEP``'s all-reduce (other ranks' routes sent to the sentinel id ``Fp8Experts`` skips), training its
    all-to-all over slices of the batch; both equal one process on that batch."""
    for rank, result in enumerate(distributed_run.ranks("ep_shared_batch")):
        assert result["logits_max_diff"] <= 1e-6 * result["logits_scale"], (rank, result)
        assert result["grads"] > 0 and result["max_grad_rel_diff"] <= 1e-5, (rank, result)


def test_bad_layouts_are_refused_by_name(distributed_run) -> None:
    for result in distributed_run.ranks("ep_refusals"):
        uneven = result["uneven"]
        assert uneven.startswith("ExpertParallelError") and "layers.0.mlp.experts" in uneven
        assert "5 experts" in uneven and "2 expert-parallel ranks" in uneven
        assert "already a DTensor" in result["after_fsdp"] and "experts.gate_up_proj" in result["after_fsdp"]
        assert "must be 1-D" in result["two_dims"]


def test_ep_with_fsdp2_on_a_mesh_whose_dp_dim_is_one_rank(distributed_run) -> None:
    """The 2-D flow on (ep=2, dp=1): ``fully_shard_experts`` on a 1-rank dp dim (FSDP2 divides by the factor
    itself there; a forced sum would leave the experts' gradients twice too large), the layers HSDP (replicated
    over ep: their gradients averaged by FSDP2). Gradients of every parameter, experts included, equal one
    process on the mean loss."""
    for rank, result in enumerate(distributed_run.ranks("ep_hsdp_qwen_dequantized")):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["grad_names"] == result["single_grad_names"]
        assert any(".experts." in n for n in result["grad_names"])
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]
