"""Qwen3-VL-MoE on 2 CPU ranks: fused expert parameters assembled from per-expert FP8 pieces (5 experts,
16x16 blocks, partial edges), under FSDP2 (``Shard(0)``: experts 0-2 and 3-4), expert parallelism
(``distribute_tensor`` ``Shard(0)`` of the experts, the rest replicated) and a row split of the experts
(``Shard(1)``: gate pieces on rank 0, up on rank 1, down pieces' rows 36 + 36, split inside a block). Each rank
reads only the pieces, and the rows of pieces, its region overlaps; everything equals the single-process load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ._expect import as_reads, assert_reads_exactly_its_share

pytestmark = pytest.mark.distributed

SCENARIOS = ("moe_fsdp", "moe_expert_parallel", "moe_expert_rows")
EXPERTS, LAYERS = 5, 2
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.language_model.layers.0.mlp.experts.down_proj"


def piece_reads(result: dict) -> list[tuple[str, object]]:
    return [
        (key, bounds)
        for key, bounds in as_reads(result["reads"])
        if ".experts." in key and "scale" not in key
    ]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_load_equals_single_process_and_each_rank_reads_its_share(distributed_run, scenario: str) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["local_mismatches"] == [] and result["full_mismatches"] == [], f"rank {rank}"
        assert result["rotary_after_load"] == [] and result.get("logits_equal", True), f"rank {rank}"
        assert_reads_exactly_its_share(rank, result)
    pieces = [piece_reads(result) for result in ranks]
    assert not set(map(repr, pieces[0])) & set(map(repr, pieces[1])), "a piece region read by both ranks"


def test_fsdp_each_rank_reads_the_pieces_of_its_experts(distributed_run) -> None:
    ranks = distributed_run.ranks("moe_fsdp")
    for rank, result in enumerate(ranks):
        assert result["plain_tensors"] == [], f"rank {rank}: not sharded"
        assert result["logits_equal"], f"rank {rank}: logits with an image differ"
        mine = range(0, 3) if rank == 0 else range(3, 5)
        assert result["expert_regions"][GATE_UP] == [[mine.start, mine.stop], [0, 48], [0, 72]]
        experts = {int(key.split(".experts.")[1].split(".")[0]) for key, _ in piece_reads(result)}
        assert experts == set(mine)
        assert all(bounds is None for _, bounds in piece_reads(result)), "whole pieces"
        assert result["pieces"] == LAYERS * len(mine) * 3
    weights = sum(r["bytes_read"] - r["scale_bytes_read"] for r in ranks)
    assert weights == ranks[0]["checkpoint_weight_bytes"]  # every weight byte read once, by one rank


def test_expert_parallel_reads_only_its_experts_and_every_replicated_tensor(distributed_run) -> None:
    """Each rank's bytes: every replicated tensor whole, plus the pieces (and scales) of its own experts, from
    the checkpoint's headers."""
    ranks = distributed_run.ranks("moe_expert_parallel")
    assert [len(piece_reads(result)) for result in ranks] == [LAYERS * 3 * 3, LAYERS * 2 * 3]  # 3 + 2 experts
    by_expert, replicated = _stored_bytes(distributed_run.out / "ckpt-qwen3_vl_moe_per_expert")
    for rank, experts in enumerate((range(0, 3), range(3, 5))):
        assert ranks[rank]["bytes_read"] == replicated + sum(by_expert[e] for e in experts), f"rank {rank}"


def test_row_split_reads_rows_of_pieces_not_block_aligned(distributed_run) -> None:
    """``Shard(1)``: gate_up_proj's 48 rows split 24 + 24, exactly gate | up; down_proj's 72 rows split
    36 + 36, so each rank reads a row range of every down piece, rank 1's starting inside a 16-row block."""
    for rank, result in enumerate(distributed_run.ranks("moe_expert_rows")):
        reads = dict(piece_reads(result))
        gate_or_up = "gate_proj" if rank == 0 else "up_proj"
        assert all((gate_or_up in key) for key in reads if "gate_proj" in key or "up_proj" in key), (
            f"rank {rank}: {sorted(reads)[:4]}"
        )
        down = {key: bounds for key, bounds in reads.items() if "down_proj" in key}
        assert len(down) == LAYERS * EXPERTS
        assert {json.dumps(b) for b in down.values()} == {
            json.dumps([[0, 36], [0, 24]] if rank == 0 else [[36, 72], [0, 24]])
        }


def test_fsdp_training_equals_single_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("moe_fsdp")):
        assert result["losses_logits"] == [False, False], "labelled calls with skip_logits use the fused loss"
        assert result["losses"] == result["reference_losses"], f"rank {rank}"
        assert result["updated_mismatches"] == [], f"rank {rank}"


def test_fsdp_save_in_the_source_format_is_the_source(distributed_run) -> None:
    """Saved right after the load by both ranks, each its own experts' pieces: every tensor is the source's,
    byte for byte."""
    ranks = distributed_run.ranks("moe_fsdp")
    written = ranks[0]["save"]["bytes_written_by_rank"]
    assert all(written) and written == ranks[1]["save"]["bytes_written_by_rank"]
    out, source = distributed_run.out / "moe-fsdp-save", distributed_run.out / "ckpt-qwen3_vl_moe_per_expert"
    saved, original = _tensors(out), _tensors(source)
    assert sorted(saved) == sorted(original)
    different = [
        k
        for k, v in original.items()
        if not torch.equal(saved[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    ]
    assert different == []


def _stored_bytes(directory: Path) -> tuple[dict[int, int], int]:
    """Bytes of each expert's tensors (pieces and scales, every layer), and of all other tensors."""
    by_expert: dict[int, int] = {}
    other = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                view = handle.get_slice(key)
                size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}[view.get_dtype()]
                nbytes = size * torch.Size(view.get_shape()).numel()
                if ".experts." in key:
                    expert = int(key.split(".experts.")[1].split(".")[0])
                    by_expert[expert] = by_expert.get(expert, 0) + nbytes
                else:
                    other += nbytes
    return by_expert, other


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out
