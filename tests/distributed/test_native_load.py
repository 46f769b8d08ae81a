"""A Mistral-native FP8 checkpoint (``params.json`` + ``consolidated.safetensors``, q/k rows in Mistral's rotary
order) in the FSDP2 flow on 2 CPU ranks: ``build_model`` -> ``fully_shard`` -> ``to_empty`` -> ``load_weights``."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.distributed

SCENARIOS = ("fsdp_native", "fsdp_native_resident")


def test_sharded_native_load_equals_single_process(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("fsdp_native")):
        assert result["plain_tensors"] == [], f"rank {rank}: not sharded"
        assert result["local_mismatches"] == [] and result["full_mismatches"] == [], f"rank {rank}"
        assert result["dequantized"] == 4 * 7, f"rank {rank}: every text projection of the 4 layers is FP8"
        assert result["logits_equal"], f"rank {rank}"


def test_rotary_order_rows_are_read_whole_and_the_others_by_share(distributed_run) -> None:
    """q's rows are permuted within each head: a rank reads all of them; v's are read as its share."""
    for rank, result in enumerate(distributed_run.ranks("fsdp_native")):
        q, v = "layers.0.attention.wq.weight", "layers.0.attention.wv.weight"
        assert all(b is None or b[0] == [0, result["rows"][q]] for b in result["bounds"][q]), f"rank {rank}"
        assert result["bounds"][v] and all(
            b is not None and b[0] != [0, result["rows"][v]] for b in result["bounds"][v]
        ), f"rank {rank}: v is read by share"


def test_sharded_save_of_rotary_order_rows_is_the_source(distributed_run) -> None:
    """Each rank writes the whole heads of the q/k rows it holds (a head's rows are permuted only among
    themselves): the saved tensors are the source's, byte for byte."""
    from mistral4_checkpoints import stored_tensors

    from . import _tiny

    assert all(result["save_error"] is None for result in distributed_run.ranks("fsdp_native"))
    source = stored_tensors(distributed_run.out / f"ckpt-{_tiny.NATIVE}")
    saved = stored_tensors(distributed_run.out / "native-fsdp-save")
    assert sorted(saved) == sorted(source)
    different = [
        k
        for k in source
        if not torch.equal(saved[k].reshape(-1).view(torch.uint8), source[k].reshape(-1).view(torch.uint8))
    ]
    assert different == []


def test_fp8_resident_sharded_native_load_permutes_rotary_rows(distributed_run) -> None:
    """``dequantize=False`` under FSDP2: q stays FP8 with its rows sharded; each rank reads q's rows whole and
    keeps its shard of the permuted codes; gathered codes, scales and logits equal one process's."""
    for rank, result in enumerate(distributed_run.ranks("fsdp_native_resident")):
        assert result["q_resident"], f"rank {rank}"
        local, total = result["q_rows"]
        assert 0 < local < total, f"rank {rank}: q's codes are not sharded"
        assert result["q_bounds"] and all(b is None or b[0] == [0, total] for b in result["q_bounds"]), rank
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["logits_equal"], f"rank {rank}"
