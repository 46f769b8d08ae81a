"""Mistral-native checkpoints saved by every rank of an FSDP2 run (2 CPU ranks): native in, native out.

Right after the load, every tensor is the source's, byte for byte (``params.json``, names, FP8 codes and
scales);
after training moved two weights, they are exactly what one process writes for the gathered weights. q/k rows
in Mistral's rotary order are permuted within each head: a rank holding whole heads writes them, a shard
boundary inside a head (the cut-heads checkpoint) has them gathered and written by rank 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automodel_plugins import from_pretrained, save_pretrained

pytestmark = [pytest.mark.distributed]

SCENARIOS = ("native_fsdp_save_cut_heads", "native_fsdp_save_mla")
CHECKPOINT = {"native_fsdp_save_cut_heads": "native_cut_heads", "native_fsdp_save_mla": "native_mla"}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def stored_bytes(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of the directory's safetensors files: dtype, shape and raw bytes (the files' headers may
    order them otherwise)."""
    from mistral4_checkpoints import stored_tensors

    return {
        key: (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for key, t in stored_tensors(directory).items()
    }


def tensor_bytes(directory: Path) -> int:
    """The bytes of every tensor in the directory's safetensors files (their size less the headers)."""
    import struct

    total = 0
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = struct.unpack("<Q", handle.read(8))[0]
        total += file.stat().st_size - 8 - header
    return total


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_untouched_fsdp_native_save_is_the_source(distributed_run, scenario: str) -> None:
    ranks = distributed_run.ranks(scenario)
    assert all(r["plain_tensors"] == [] for r in ranks), "not sharded"
    name = CHECKPOINT[scenario]
    source = distributed_run.out / f"ckpt-{name}"
    saved = distributed_run.out / f"{name}-fsdp-save" / "untouched"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (saved / "params.json").read_bytes() == (source / "params.json").read_bytes()
    assert stored_bytes(saved) == stored_bytes(source)
    report = ranks[0]["untouched"]
    assert report["scales_fresh"] == 0 and report["scales_kept"] == report["quantized"] > 0
    written = report["bytes_written_by_rank"]
    assert all(share > 0 for share in written) and sum(written) == tensor_bytes(saved)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trained_fsdp_native_save_is_what_one_process_writes(
    distributed_run, scenario: str, tmp_path: Path
) -> None:
    ranks = distributed_run.ranks(scenario)
    name = CHECKPOINT[scenario]
    base = distributed_run.out / f"{name}-fsdp-save"
    model = from_pretrained(distributed_run.out / f"ckpt-{name}")
    model.load_state_dict(load_file(base / "trained-weights.safetensors"), strict=True)
    one = save_pretrained(model, tmp_path / "one")
    assert files_of(base / "trained") == files_of(tmp_path / "one")
    report = ranks[0]["trained"]
    assert report["scales_fresh"] == one.scales_fresh >= 1  # the grown weight (and each grown piece)
    assert sum(report["bytes_written_by_rank"]) == tensor_bytes(base / "trained")


def test_heads_cut_by_the_shards_are_gathered_whole_heads_are_written_by_their_rank(distributed_run) -> None:
    """The cut-heads checkpoint really is cut (q 24 + 24 rows of 16-row heads, k 8 + 8), its vision q/k not."""
    ranks = distributed_run.ranks("native_fsdp_save_cut_heads")
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    k = "model.language_model.layers.0.self_attn.k_proj.weight"
    vision = "model.vision_tower.transformer.layers.0.attention.q_proj.weight"
    assert [r["regions"][q][0] for r in ranks] == [[0, 24], [24, 48]]
    assert [r["regions"][k][0] for r in ranks] == [[0, 8], [8, 16]]
    assert [r["regions"][vision][0] for r in ranks] == [[0, 16], [16, 32]]
