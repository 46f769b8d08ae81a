"""FP8-resident experts (``dequantize=False``) of a Qwen3-VL-MoE under FSDP2 on 2 CPU ranks: the experts are
``Fp8Experts`` (5 experts, 16x16 blocks, every piece on block boundaries), ``Shard(0)``: experts 0-2 on rank 0,
3-4 on rank 1. Each rank reads the FP8 bytes of its own experts' pieces only, and every piece's scale (the
stacked grids are replicated buffers); gathered, the codes and grids are the single-process load's bit for bit;
the logits equal, and a LoRA step on 2 ranks equals the same step in one process."""

from __future__ import annotations

import pytest

from ._expect import as_reads, assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

SCENARIOS = ("moe_fsdp_resident",)
EXPERTS, LAYERS = 5, 2
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"


def code_reads(result: dict) -> list[tuple[str, object]]:
    return [(k, b) for k, b in as_reads(result["reads"]) if ".experts." in k and "scale" not in k]


def scale_reads(result: dict) -> list[str]:
    return [k for k, _ in as_reads(result["reads"]) if ".experts." in k and k.endswith("_scale_inv")]


def test_each_rank_reads_the_codes_of_its_experts_and_every_scale(distributed_run) -> None:
    ranks = distributed_run.ranks("moe_fsdp_resident")
    for rank, result in enumerate(ranks):
        assert result["resident_experts"] == LAYERS and result["fp8_not_resident"] == []
        assert result["kept_fp8"] == LAYERS * (4 + 2) and result["dequantized"] == 0, f"rank {rank}"
        assert result["codes_dtype"] == "torch.uint8"
        assert_reads_exactly_its_share(rank, result)
        mine = range(0, 3) if rank == 0 else range(3, 5)
        assert result["expert_regions"][GATE_UP] == [[mine.start, mine.stop], [0, 64], [0, 48]]
        experts = {int(key.split(".experts.")[1].split(".")[0]) for key, _ in code_reads(result)}
        assert experts == set(mine) and all(bounds is None for _, bounds in code_reads(result))
        assert (
            len(scale_reads(result)) == LAYERS * EXPERTS * 3
        )  # every piece's grid, for the whole stacked grid
        assert result["pieces"] == LAYERS * len(mine) * 3
    assert not set(map(repr, code_reads(ranks[0]))) & set(map(repr, code_reads(ranks[1])))
    weights = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    assert weights == ranks[0]["checkpoint_weight_bytes"]  # every code byte read once, by one rank


def test_gathered_codes_grids_and_logits_equal_the_single_process_load(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("moe_fsdp_resident")):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}"


def test_a_lora_step_on_two_ranks_equals_one_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("moe_fsdp_resident")):
        assert result["grad_names"] == result["single_grad_names"], f"rank {rank}"
        assert len(result["grad_names"]) == LAYERS * 4 * 2 and all("lora_" in n for n in result["grad_names"])
        single, sharded = result["single_losses"], result["losses"]
        assert abs(sharded[0] - single[0]) <= 1e-6 and abs(sharded[1] - single[1]) <= 1e-6, (sharded, single)
        assert single[1] != single[0], "the step must change the loss"
        assert result["max_grad_diff"] <= 1e-6 and result["max_param_diff"] <= 1e-6, result
