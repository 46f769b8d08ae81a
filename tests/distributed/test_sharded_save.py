"""Sharded saves on 2 CPU ranks (gloo): FSDP2 and a tensor-parallel layout with ``Shard(1)`` weights.

Every rank calls ``save_pretrained``; the files must be exactly those a single process (this pytest process, no
process group) writes for the same weights, in every format, and each rank must have written its own share:
the bytes of the regions it holds (by ``torch.chunk``'s rule, computed here), rank 0 also the scales, the
carried activation scales and the tensors no rank shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from automodel_plugins import from_pretrained, save_pretrained

from . import _tiny

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:.*partial:UserWarning")]

SCENARIOS = (
    "fsdp_save_per_tensor",
    "fsdp_save_block",
    "tp_save_block",
    "tp_save_per_tensor",
    "save_failures",
)
FORMATS = {"source": {}, "fp8-block": {"block_size": _tiny.BLOCK}, "none": {}}
GROWN = "model.language_model.layers.1.mlp.up_proj.weight"
CHECKPOINT_OF = {
    "fsdp_save_per_tensor": "per_tensor_tied",
    "fsdp_save_block": "block_untied",
    "tp_save_block": "block_untied",
    "tp_save_per_tensor": "per_tensor_untied",
}


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def single_process_save(checkpoint: Path, weights: Path | None, dest: Path, grow: bool = False) -> None:
    """What one process writes: the checkpoint loaded here, given ``weights`` (the ranks' trained ones) or
    with the grown weight grown the same way, saved in every format."""
    model = from_pretrained(checkpoint)
    if weights is not None:
        model.load_state_dict(load_file(weights), strict=True)
    if grow:
        with torch.no_grad():
            model.get_parameter(GROWN).mul_(3.0)
    for quantization, options in FORMATS.items():
        save_pretrained(model, dest / quantization, quantization=quantization, **options)


def expected_shares(directory: Path, regions: list[dict[str, Any]]) -> list[int]:
    """Each rank's bytes: its region of every model tensor; rank 0 also every tensor that is not a model
    tensor (scales, activation scales) and those held whole."""
    headers: dict[str, tuple[int, tuple[int, ...]]] = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_slice(key)
                dtype = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8}[tensor.get_dtype()]
                headers[key] = (dtype, tuple(tensor.get_shape()))
    shares = [0] * len(regions)
    keys_of_names = {_tiny.legacy_rename(name): name for name in regions[0]}
    for key, (itemsize, shape) in headers.items():
        name = keys_of_names.get(key)
        if name is None:
            shares[0] += itemsize * math.prod(shape)
            continue
        for rank, held in enumerate(regions):
            bounds = held[name]
            if bounds is None:
                shares[rank] += itemsize * math.prod(shape) if rank == 0 else 0
            else:
                shares[rank] += itemsize * math.prod(stop - start for start, stop in bounds)
    return shares


@pytest.fixture(scope="module")
def single(distributed_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process saves each scenario is compared with (written once for the module)."""
    root = tmp_path_factory.mktemp("single")
    out = distributed_run.out
    saves = {}
    for scenario, checkpoint in CHECKPOINT_OF.items():
        distributed_run.ranks(scenario)  # fails here with the rank's traceback if the scenario failed
        path = out / f"ckpt-{checkpoint}"
        if scenario.startswith("fsdp"):
            saves[f"{scenario}/untouched"] = root / scenario / "untouched"
            single_process_save(path, None, saves[f"{scenario}/untouched"])
            trained = out / f"fsdp-save-{checkpoint}" / "trained-weights.safetensors"
            saves[f"{scenario}/trained"] = root / scenario / "trained"
            single_process_save(path, trained, saves[f"{scenario}/trained"])
        else:
            saves[scenario] = root / scenario
            single_process_save(path, None, saves[scenario], grow=True)
    return saves


def test_launch_exits_cleanly(distributed_run) -> None:
    assert distributed_run.returncode == 0, distributed_run.log_tail()


CASES = [
    ("fsdp_save_per_tensor", "untouched"),
    ("fsdp_save_per_tensor", "trained"),
    ("fsdp_save_block", "untouched"),
    ("fsdp_save_block", "trained"),
    ("tp_save_block", None),
    ("tp_save_per_tensor", None),
]


def rank_dir(distributed_run, scenario: str, stage: str | None) -> Path:
    kind = "fsdp-save" if scenario.startswith("fsdp") else "tp-save"
    base = distributed_run.out / f"{kind}-{CHECKPOINT_OF[scenario]}"
    return base / stage if stage else base


@pytest.mark.parametrize("quantization", list(FORMATS))
@pytest.mark.parametrize(("scenario", "stage"), CASES, ids=[f"{s}-{t or 'grown'}" for s, t in CASES])
def test_two_ranks_write_the_files_one_process_writes(
    distributed_run, single, scenario: str, stage: str | None, quantization: str
) -> None:
    ranks_wrote = files_of(rank_dir(distributed_run, scenario, stage) / quantization)
    one_wrote = files_of(single[f"{scenario}/{stage}" if stage else scenario] / quantization)
    assert sorted(ranks_wrote) == sorted(one_wrote)
    different = [name for name in one_wrote if ranks_wrote[name] != one_wrote[name]]
    assert not different, different


def test_untouched_fsdp_saves_are_the_source_bytes(distributed_run) -> None:
    for scenario in ("fsdp_save_per_tensor", "fsdp_save_block"):
        source = distributed_run.out / f"ckpt-{CHECKPOINT_OF[scenario]}"
        saved = rank_dir(distributed_run, scenario, "untouched") / "source"
        tensors = {}
        for file in sorted(source.glob("*.safetensors")):
            tensors.update(load_file(file))
        again = load_file(saved / "model.safetensors")
        assert sorted(again) == sorted(tensors)
        assert all(
            torch.equal(again[k].view(torch.uint8), tensors[k].view(torch.uint8))
            for k in tensors
            if tensors[k].dtype.itemsize == 1
        )
        assert all(torch.equal(again[k], tensors[k]) for k in tensors if tensors[k].dtype.itemsize > 1)
        report = distributed_run.ranks(scenario)[0]["untouched"]["reports"]["source"]
        assert report["scales_fresh"] == 0 and report["scales_kept"] == report["quantized"] > 0


def test_the_grown_weight_got_a_fresh_scale_combined_over_ranks(distributed_run) -> None:
    for scenario in ("fsdp_save_per_tensor", "fsdp_save_block", "tp_save_block", "tp_save_per_tensor"):
        result = distributed_run.ranks(scenario)[0]
        reports = result["trained"]["reports"] if "trained" in result else result["reports"]
        assert reports["source"]["scales_fresh"] >= 1, scenario
    assert distributed_run.ranks("tp_save_block")[0]["grown_placements"] == ["Shard(dim=1)"]


@pytest.mark.parametrize("quantization", list(FORMATS))
@pytest.mark.parametrize(("scenario", "stage"), CASES, ids=[f"{s}-{t or 'grown'}" for s, t in CASES])
def test_each_rank_wrote_its_own_share(
    distributed_run, scenario: str, stage: str | None, quantization: str
) -> None:
    ranks = distributed_run.ranks(scenario)
    results = [r[stage] if stage else r for r in ranks]
    written = [r["reports"][quantization]["bytes_written"] for r in results]
    assert results[0]["reports"][quantization]["bytes_written_by_rank"] == written
    expected = expected_shares(
        rank_dir(distributed_run, scenario, stage) / quantization, [r["regions"] for r in results]
    )
    assert written == expected
    assert all(share > 0 for share in written)


def test_a_failure_on_one_rank_fails_every_rank_and_leaves_nothing(distributed_run) -> None:
    ranks = distributed_run.ranks("save_failures")
    own, other = ranks[1]["full_disk"], ranks[0]["full_disk"]
    assert own[0] == "SaveWriteError" and "disk is full" in own[1] and own[2] == 28  # ENOSPC
    assert other[0] == "SaveWriteError" and "rank 1" in other[1]
    for result in ranks:
        assert result["taken"][0] == "DestinationError" and "non-empty" in result["taken"][1]
        assert result["left_in_full"] == [], "no temporary directory, no destination"
        assert result["left_in_parent"] == ["full", "taken"]
        assert result["taken_contents"] == ["mine.txt"]
