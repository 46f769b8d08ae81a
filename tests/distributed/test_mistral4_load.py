"""Mistral 4 (Mistral Small 4's HF form) on 2 CPU ranks under FSDP2: the fused experts with one scale per expert
(``[E, 1, 1]``) dequantized and kept FP8 (``Fp8Experts``, codes ``Shard(0)``: experts 0-1 and 2-3), and
per-expert block-FP8 pieces assembled into the fused tensors; gathered tensors, rotary buffers and logits with an
image equal the single-process load, and a source-format save of the sharded model is the source, byte for byte.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed

FSDP = ("mistral4_fsdp_per_tensor", "mistral4_fsdp_per_expert", "mistral4_fsdp_resident")
SPLITS = ("mistral4_expert_parallel", "mistral4_expert_rows", "mistral4_expert_parallel_pieces")
SCENARIOS = FSDP + SPLITS


@pytest.mark.parametrize("scenario", FSDP)
def test_fsdp_load_equals_single_process(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["full_mismatches"] == [] and result["rotary_mismatches"] == [], f"rank {rank}"
        # FP8-resident layers' scales are replicated buffers, by design; every parameter is sharded
        replicated = ("_scale_inv", "activation_scale")  # buffers: FSDP2 leaves them whole
        assert [n for n in result["plain_tensors"] if not n.endswith(replicated)] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}: logits with an image differ"
        experts = [[0, 2], [0, 48], [0, 64]] if rank == 0 else [[2, 4], [0, 48], [0, 64]]
        assert result["expert_region"] == experts, f"rank {rank}"


def test_resident_experts_stay_fp8_under_fsdp(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("mistral4_fsdp_resident")):
        assert result["resident_experts"] == 2 and result["expert_dtype"] == "torch.uint8", f"rank {rank}"
    for scenario in ("mistral4_fsdp_per_tensor", "mistral4_fsdp_per_expert"):
        assert all(r["resident_experts"] == 0 for r in distributed_run.ranks(scenario))


@pytest.mark.parametrize("scenario", FSDP)
def test_source_save_after_the_sharded_load_is_the_source(distributed_run, scenario: str) -> None:
    result = distributed_run.ranks(scenario)[0]
    assert result["save_keys_equal"] and result["save_different"] == []


@pytest.mark.parametrize("scenario", SPLITS)
def test_expert_splits_equal_single_process_and_read_each_expert_byte_once(
    distributed_run, scenario: str
) -> None:
    """Expert parallelism (each rank its 2 experts) and a row split of every expert (``Shard(1)``: rows inside
    the one whole-matrix block of an ``[E, 1, 1]`` scale); per-expert pieces too. No region of an expert tensor
    is read by both ranks, and together they read every expert byte once."""
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["local_mismatches"] == [] and result["full_mismatches"] == [], f"rank {rank}"
    first, second = ({json.dumps(read) for read in result["expert_reads"]} for result in ranks)
    assert first and second and not first & second
    assert sum(r["expert_bytes_read"] for r in ranks) == ranks[0]["expert_bytes"]
