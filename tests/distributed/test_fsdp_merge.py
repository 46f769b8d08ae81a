"""``merge_lora`` on an FSDP2-sharded FP8-resident LoRA model, 2 CPU ranks on gloo (issue 20, item 7)::

    model = build_model(path, dequantize=False); peft LoRA; fully_shard(...); to_empty; load_weights
    ... one LoRA step (each rank half the batch) ...
    merged = automodel_plugins.merge_lora(model)           # every rank: its own rows
    automodel_plugins.save_pretrained(merged, dest)         # every rank: its own shards

It used to fail with ``ValueError: NULL pointer access`` (the CPU decode reading a sharded parameter). Each rank
now merges the rows it holds (local codes with the matching rows of the scale grid, its rows of ``lora_B``,
``lora_A`` gathered). The reference is one process (this pytest process, no process group) loading the same
checkpoint, given the same trained adapters (gathered by the ranks), merging with ``merge_lora`` and saving:
the gathered merged weights must equal its merge bit for bit, and the files the two ranks write must be its
files byte for byte, in the source FP8 format (merged layers re-quantized) and in BF16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import automodel_plugins

from ._worker import MERGE_FORMATS, with_lora

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:.*partial:UserWarning")]

CHECKPOINT_OF = {
    "fsdp_resident_merge_per_tensor": "per_tensor_untied",
    "fsdp_resident_merge_block": "block_untied",
}
SCENARIOS = tuple(CHECKPOINT_OF)
MERGED = 4 * 7
"""The merged FP8 projections: 4 text layers x 7 (the vision tower's LoRA layers and the projector's merge too)."""


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def single(distributed_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process: the checkpoint loaded FP8-resident, the ranks' trained adapters, ``merge_lora``, saved."""
    root = tmp_path_factory.mktemp("single-merge")
    saves = {}
    for scenario, checkpoint in CHECKPOINT_OF.items():
        distributed_run.ranks(scenario)  # fails here with the rank's traceback if the scenario failed
        adapters = load_file(distributed_run.out / f"merge-{checkpoint}" / "adapters.safetensors")
        model = with_lora(
            automodel_plugins.from_pretrained(distributed_run.out / f"ckpt-{checkpoint}", dequantize=False)
        )
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert sorted(lora) == sorted(adapters)
        with torch.no_grad():
            for name, param in lora.items():
                param.copy_(adapters[name])
        merged = automodel_plugins.merge_lora(model)
        for quantization in MERGE_FORMATS:
            automodel_plugins.save_pretrained(
                merged, root / scenario / quantization, quantization=quantization
            )
        saves[scenario] = root / scenario
    return saves


def test_launch_exits_cleanly(distributed_run) -> None:
    assert distributed_run.returncode == 0, distributed_run.log_tail()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_merges_its_own_rows(distributed_run, scenario: str) -> None:
    ranks = distributed_run.ranks(scenario)
    for rank, result in enumerate(ranks):
        assert result["merged_type"] == "Mistral3ForConditionalGeneration", f"rank {rank}"
        assert result["fp8_left"] == 0 and result["lora_left"] == 0, f"rank {rank}"
        assert len(result["merged_sharded"]) == MERGED, f"rank {rank}"
        assert not result["quantization_config"], "no FP8 layer left: the quantization is dropped"
    for name in ranks[0]["merged_sharded"]:
        (r0, split), cols0 = ranks[0]["merged_rows"][name]
        (start, stop), cols1 = ranks[1]["merged_rows"][name]
        assert r0 == 0 and split == start < stop and cols0 == cols1, name  # complementary row ranges


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_merged_weights_equal_a_one_process_merge(distributed_run, scenario: str) -> None:
    for rank, result in enumerate(distributed_run.ranks(scenario)):
        assert result["merge_mismatches"] == [], f"rank {rank}"


@pytest.mark.parametrize("quantization", MERGE_FORMATS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_save_the_files_one_process_saves(
    distributed_run, single: dict[str, Path], scenario: str, quantization: str
) -> None:
    ranks_wrote = files_of(distributed_run.out / f"merge-{CHECKPOINT_OF[scenario]}" / quantization)
    one_wrote = files_of(single[scenario] / quantization)
    assert sorted(ranks_wrote) == sorted(one_wrote)
    assert [name for name in one_wrote if ranks_wrote[name] != one_wrote[name]] == []
    shares = distributed_run.ranks(scenario)[0]["reports"][quantization]["bytes_written_by_rank"]
    assert len(shares) == 2 and all(share > 0 for share in shares)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_merged_fp8_save_changed_the_merged_layers(distributed_run, scenario: str) -> None:
    """The merge reached the file: merged layers' codes differ from the source's, untouched tensors do not."""
    checkpoint = CHECKPOINT_OF[scenario]
    source: dict[str, torch.Tensor] = {}
    for file in sorted((distributed_run.out / f"ckpt-{checkpoint}").glob("*.safetensors")):
        source.update(load_file(file))
    saved = load_file(distributed_run.out / f"merge-{checkpoint}" / "source" / "model.safetensors")
    assert sorted(saved) == sorted(source)
    fp8 = [k for k, v in source.items() if v.dtype == torch.float8_e4m3fn]
    changed = [k for k in fp8 if not torch.equal(saved[k].view(torch.uint8), source[k].view(torch.uint8))]
    assert len(fp8) == MERGED and len(changed) == MERGED
    embed = next(k for k in source if k.endswith("embed_tokens.weight"))
    assert torch.equal(saved[embed], source[embed])
