"""LoRA on FP8-resident experts (PEFT ``target_parameters`` on ``Fp8Experts``) under expert parallelism, 2 gloo
ranks, experts 0-1 and 2-3 of 4, each rank its own batch; PEFT before ``parallelize_experts`` and after it. The
experts' adapters keep PEFT's global shapes, split by expert (each rank holds its experts' rows: DTensors); their
gradients, divided by the ranks, equal one process on the mean loss (sharding specifics: test_ep_lora_shard.py). ``merge_lora`` on
every rank re-quantizes only its own moved experts, and the files every rank writes are, byte for byte, the
one-process merge and save of the same adapters; PEFT's adapter save under EP is the one-process adapter file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import automodel_plugins

from ._ep_lora import with_experts_lora

pytestmark = pytest.mark.distributed

ORDERS = ("ep_experts_lora_peft_first", "ep_experts_lora_peft_after")
SCENARIOS = (*ORDERS, "ep_experts_lora_refusals", "fsdp_experts_lora_plan")
LAYERS, EXPERTS, R = 2, 4, 4
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("scenario", ORDERS)
def test_a_lora_step_on_split_experts_equals_one_process(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert len(result["applied"]) == LAYERS
        assert all("2 of 4 experts" in v for v in result["applied"].values()), result["applied"]
        assert result["lora_shapes"] == result["single_lora_shapes"]  # PEFT's global [r * E, ...]
        assert all(R * EXPERTS in shape for shape in result["lora_shapes"].values())
        assert result["grad_names"] == result["single_grad_names"]
        assert result["expert_lora_grads"] == LAYERS * 2 * 2  # lora_A and lora_B of both fused tensors
        # the only DTensor gradients are the experts' factors' (split by expert): the codes are no parameter that trains
        assert result["expert_grads"] == result["expert_lora_grads"]
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]
        assert abs(result["loss_after"] - result["single_loss_after"]) <= 1e-5 * result["single_loss_after"]
        assert result["loss_after"] < result["loss"], "the step must move the loss"
        assert result["codes_changed"] == [], f"rank {rank}"


@pytest.mark.parametrize("scenario", ORDERS)
def test_merge_on_every_rank_requantizes_its_own_experts(distributed_run, scenario) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["resident_experts"] == LAYERS and result["lora_left"] == 0, f"rank {rank}"
        assert result["expert_regions"][GATE_UP][0] == [2 * rank, 2 * rank + 2]
        # every expert was reached by tokens, so each rank re-quantized exactly its two
        assert all(moved == [2 * rank, 2 * rank + 1] for moved in result["moved_here"].values()), result[
            "moved_here"
        ]
        assert all(b > 0 for b in result["bytes_written_by_rank"]), result["bytes_written_by_rank"]


def _single(out: Path, adapters: dict[str, torch.Tensor]):
    """One process (no process group): the launch's checkpoint FP8-resident with ``adapters``."""
    model = with_experts_lora(
        automodel_plugins.from_pretrained(out / "ckpt-ep_qwen3_vl_moe", dequantize=False, dtype=torch.float32)
    )
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(adapters)
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(adapters[name])
    return model


def _config(folder: Path) -> dict:
    """``adapter_config.json``, its name lists sorted (PEFT writes ``target_modules``, a set, in hash order)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()}


def _same_files(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


@pytest.mark.parametrize("scenario", ORDERS)
def test_the_saves_are_the_one_process_saves(distributed_run, scenario, tmp_path: Path) -> None:
    """One process (this pytest process, no process group), the ranks' trained adapters: PEFT's adapter save is
    the file PEFT's save under expert parallelism wrote (every rank calling it: it gathers the split factors; rank
    0 writing); ``merge_lora`` + ``save_pretrained`` writes the files every rank wrote, byte for byte."""
    distributed_run.ranks(scenario)  # fails here with the rank's traceback if the scenario failed
    order = scenario.removeprefix("ep_experts_lora_")
    out = distributed_run.out / f"ep-lora-{order}"
    model = _single(distributed_run.out, load_file(out / "adapters.safetensors"))
    model.save_pretrained(tmp_path / "adapter")
    name = "adapter_model.safetensors"
    assert (out / "adapter" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    got, want = (_config(folder / "adapter") for folder in (out, tmp_path))
    assert got == want
    automodel_plugins.save_pretrained(automodel_plugins.merge_lora(model), tmp_path / "merged")
    _same_files(out / "merged", tmp_path / "merged")


def test_lora_on_dequantized_split_experts_is_refused_by_name(distributed_run) -> None:
    """PEFT first: ``parallelize_experts`` names the stock wrapper. PEFT after (what stock PEFT does, recorded):
    its parametrization of the fused DTensor fails in the first forward."""
    for result in distributed_run.ranks("ep_experts_lora_refusals"):
        first = result["peft_first"]
        assert first.startswith("ExpertParallelError") and "layers.0.mlp.experts" in first, first
        assert "dequantize=False" in first
        assert result["peft_after"].startswith("RuntimeError") and "DTensor" in result["peft_after"]


@pytest.mark.parametrize("scenario", (*ORDERS, "fsdp_experts_lora_plan"))
def test_the_plan_counts_the_expert_adapters_each_rank_holds(distributed_run, scenario) -> None:
    """``plan_memory(..., lora_target_parameters=[...])`` against each rank's measured LoRA parameter bytes (EP:
    each rank its experts' factors; FSDP2: sharded): within 10% (the bar), exact here."""
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        planned, measured = result["planned_lora"], result["measured_lora"]
        assert abs(planned["params"] - measured) <= 0.1 * measured, (rank, planned, measured)
        assert planned["params"] == measured, (rank, planned, measured)
        assert planned["grads"] == planned["params"] and planned["optimizer"] == 2 * planned["params"]
        # without target_parameters the plan counts the attention's adapters only: less than the rank holds
        assert result["planned_attention_lora"]["params"] < measured, (rank, result)
