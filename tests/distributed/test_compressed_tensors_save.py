"""FSDP2 saves of a compressed-tensors model (2 CPU ranks): as it came, byte-identical to the source; re-quantized
to fp8-block, the files one process writes (the ignored modules BF16 in both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automodel_plugins import from_pretrained, save_pretrained
from distributed.test_native_save import files_of, stored_bytes, tensor_bytes

pytestmark = [pytest.mark.distributed]

SCENARIOS = ("ct_fsdp_save",)


def test_untouched_fsdp_source_save_is_the_source(distributed_run) -> None:
    (rank0, _) = ranks = distributed_run.ranks("ct_fsdp_save")
    assert all(r["plain_tensors"] == [] for r in ranks), "not sharded"
    source = distributed_run.out / "ckpt-ct" / "hf-ct"
    saved = distributed_run.out / "ct-fsdp-save" / "source"
    assert stored_bytes(saved) == stored_bytes(source)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config == json.loads((source / "config.json").read_text())["quantization_config"]
    report = rank0["source"]
    assert report["scales_fresh"] == 0 and report["scales_kept"] == report["quantized"] > 0
    written = report["bytes_written_by_rank"]
    assert all(share > 0 for share in written) and sum(written) == tensor_bytes(saved)


def test_fsdp_fp8_block_save_is_what_one_process_writes(distributed_run, tmp_path: Path) -> None:
    distributed_run.ranks("ct_fsdp_save")
    source = distributed_run.out / "ckpt-ct" / "hf-ct"
    model = from_pretrained(source)
    save_pretrained(model, tmp_path / "one", quantization="fp8-block", block_size=8)
    sharded = distributed_run.out / "ct-fsdp-save" / "fp8-block"
    assert files_of(sharded) == files_of(tmp_path / "one")
    skip = json.loads((sharded / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {"model.vision_tower", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"} <= set(skip)
