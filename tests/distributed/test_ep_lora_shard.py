"""Expert LoRA factors split by expert under expert parallelism (2 gloo ranks, experts 0-1 and 2-3 of 4, r=4):
each rank holds exactly its experts' rows of PEFT's factors (DTensors on the EP mesh), the step and an AdamW
update equal one process's, the plan counts what each rank holds, and PEFT's adapter save from every rank is
the one-process file, which ``PeftModel.from_pretrained`` loads back into split factors. Scenario module:
``_ep_lora_shard.py``. (Merge and the merged save under EP: ``test_ep_lora.py``; FSDP2 over dp:
``test_ep_lora_fsdp.py``.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_ep_lora import _config, _single

pytestmark = pytest.mark.distributed

SCENARIOS = ("ep_lora_shard_peft_first", "ep_lora_shard_peft_after_load")
LAYERS, EXPERTS, R, WORLD = 2, 4, 4, 2
FACTORS = LAYERS * 2 * 2  # lora_A and lora_B of both fused tensors of each layer


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_holds_its_experts_rows_of_every_factor(distributed_run, scenario) -> None:
    """``lora_A [r * E, in]`` ``Shard(0)``, ``lora_B [out, r * E]`` ``_StridedShard(1, split_factor=r)``: the local
    values are the rank's experts' rows as PEFT reads the factors (``[E, r, in]``, ``[out, r, E]``); PEFT on the
    loaded model with another seed on rank 1 still holds rank 0's (one process's) initialization."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert len(result["placements"]) == FACTORS, (rank, result["placements"])
        for name, placements in result["placements"].items():
            want = "Shard(dim=0)" if ".lora_A." in name else f"_StridedShard(dim=1, sf={R})"
            assert placements == [want], (rank, name, placements)
        assert result["global_shapes"] == result["single_shapes"]
        for name, (rows, cols) in result["global_shapes"].items():
            split = [rows // WORLD, cols] if ".lora_A." in name else [rows, cols // WORLD]
            assert result["local_shapes"][name] == split, (rank, name)
            assert R * EXPERTS in (rows, cols)
        assert result["init_mismatch"] == [], (rank, result["init_mismatch"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_step_on_split_factors_equals_one_process(distributed_run, scenario) -> None:
    """Loss and every LoRA gradient against one process on the mean loss (the EP LoRA tolerances); a split
    factor's gradient is its experts' rows summed over both ranks' tokens, i.e. the ranks' count times one
    process's rows."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["grad_names"] == result["single_grad_names"]
        assert (
            result["expert_grads"] == FACTORS
        )  # the split factors' gradients are DTensors; the codes have none
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert result["grad_rows_rel_diff"] <= 1e-5, (rank, result["grad_rows_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_adamw_updates_each_ranks_rows_only(distributed_run, scenario) -> None:
    """``torch.optim.AdamW`` over the split factors: its states are DTensors placed as the factors (each rank
    its rows), the step on each rank is, bit for bit, AdamW on its rows and their gradients alone, and it is one
    process's step (within 1% of lr: the first AdamW step ``lr * g / (|g| + eps)`` amplifies the gradients'
    rounding where ``|g|`` is tiny); the loss after it equals one process's."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert len(result["adam_states_split"]) == FACTORS, (rank, result["adam_states_split"])
        assert result["adam_local_max_diff"] == 0.0, rank
        assert result["adam_moved_from"] > 0.5e-2, rank  # about lr: the step did move the rows
        assert result["adam_vs_single_over_lr"] <= 1e-2, (rank, result["adam_vs_single_over_lr"])
        after, single_after = result["loss_after"], result["single_loss_after"]
        assert after < result["loss"] and abs(after - single_after) <= 1e-5 * single_after


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_plan_counts_each_ranks_experts_factors(distributed_run, scenario) -> None:
    """``plan_memory(..., ep=2, lora_target_parameters=...)`` equals each rank's measured LoRA bytes, which are
    the attention's adapters plus half of every expert factor (fp32)."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        planned, measured = result["planned_lora"], result["measured_lora"]
        assert planned["params"] == measured, (rank, planned, measured)
        expert_bytes = sum(4 * math.prod(shape) for shape in result["global_shapes"].values())
        assert measured == result["planned_attention_lora"]["params"] + expert_bytes // WORLD


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_adapter_saved_from_every_rank_is_the_one_process_file(
    distributed_run, scenario, tmp_path: Path
) -> None:
    """Every rank called PEFT's ``save_pretrained`` (it gathers the split factors; rank 0 wrote): the file is
    byte for byte what one process holding the same trained adapters saves."""
    distributed_run.ranks(scenario)
    out = distributed_run.out / scenario.replace("ep_lora_shard_", "ep-lora-shard-")
    trained = load_file(out / "adapters.safetensors")
    assert all(t.dtype == torch.float32 for t in trained.values())
    model = _single(distributed_run.out, trained)
    model.save_pretrained(tmp_path / "adapter")
    name = "adapter_model.safetensors"
    assert (out / "adapter" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    assert _config(out / "adapter") == _config(tmp_path / "adapter")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_from_pretrained_loads_the_file_into_split_factors(distributed_run, scenario) -> None:
    """``PeftModel.from_pretrained`` of that file onto a fresh split model (PEFT's whole factors in the file):
    each rank keeps its experts' rows, and the loss on its batch is the trained model's."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["loaded_names"] is True
        assert len(result["loaded_split"]) == FACTORS, (rank, result["loaded_split"])
        assert result["loaded_mismatch"] == [], (rank, result["loaded_mismatch"])
        assert result["loss_loaded"] == result["loss_trained"], rank
