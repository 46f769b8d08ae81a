"""LoRA on FP8-resident experts (PEFT ``target_parameters`` on ``Fp8Experts``) under FSDP2 on 2 CPU ranks: the
tiny aligned Qwen3-VL-MoE (5 experts, ``Shard(0)``: 0-2 and 3-4), LoRA on q/v and both fused expert tensors. A
step on 2 ranks equals one process on the mean of both ranks' sequences; the codes never change; ``merge_lora``
on every rank (each re-quantizes its own experts) gives the one-process merge bit for bit, and the files every
rank writes are byte-identical to the one-process save of the same merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import automodel_plugins

from ._experts_lora import with_experts_lora

pytestmark = pytest.mark.distributed

SCENARIOS = ("moe_fsdp_experts_lora",)
LAYERS, EXPERTS = 2, 5
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"


def test_a_lora_step_on_the_experts_on_two_ranks_equals_one_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("moe_fsdp_experts_lora")):
        assert result["codes_placements"][GATE_UP] == [[0, 3] if rank == 0 else [3, 5], [0, 64], [0, 48]]
        assert result["grad_names"] == result["single_grad_names"], f"rank {rank}"
        names = result["grad_names"]
        assert len(names) == LAYERS * (2 + 2) * 2 and all("lora_" in n for n in names)
        assert sum(".experts." in n for n in names) == LAYERS * 2 * 2
        single, sharded = result["single_losses"], result["losses"]
        assert abs(sharded[0] - single[0]) <= 1e-6 and abs(sharded[1] - single[1]) <= 1e-6, (sharded, single)
        assert single[1] != single[0], "the step must change the loss"
        assert max(result["grad_diffs"].values()) <= 1e-6 * max(1.0, result["largest_grad"]), result[
            "grad_diffs"
        ]
        assert result["codes_changed"] == [], f"rank {rank}"


def test_merge_on_every_rank_equals_one_process_and_saves_the_same_bytes(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("moe_fsdp_experts_lora")):
        assert result["resident_experts"] == LAYERS and result["lora_left"] == 0, f"rank {rank}"
        assert result["experts_sharded"] == [True] * LAYERS
        assert result["merge_mismatches"] == [], f"rank {rank}"
        assert all(0 < moved <= EXPERTS for moved in result["moved_experts"].values()), result[
            "moved_experts"
        ]
        assert all(b > 0 for b in result["bytes_written_by_rank"]), result["bytes_written_by_rank"]


def test_the_files_every_rank_writes_are_the_one_process_save(distributed_run, tmp_path: Path) -> None:
    """One process (this pytest process, no process group): the checkpoint FP8-resident, the ranks' trained
    adapters, ``merge_lora``, ``save_pretrained``: the same files, byte for byte."""
    distributed_run.ranks(
        "moe_fsdp_experts_lora"
    )  # fails here with the rank's traceback if the scenario failed
    out = distributed_run.out / "experts-lora"
    adapters = load_file(out / "adapters.safetensors")
    model = with_experts_lora(
        automodel_plugins.from_pretrained(distributed_run.out / "ckpt-qwen3_vl_moe_aligned", dequantize=False)
    )
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(adapters)
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(adapters[name])
    automodel_plugins.save_pretrained(automodel_plugins.merge_lora(model), tmp_path / "single")
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (out / "sharded").iterdir()) == single
    for name in single:
        assert (out / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
