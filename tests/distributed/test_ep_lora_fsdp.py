"""LoRA on FP8-resident experts under expert parallelism combined with FSDP2 on a 2-D mesh, 4 gloo ranks:
``(ep=2, dp=2)``, PEFT on meta, ``parallelize_experts`` over ep (the experts' factors split by expert),
``fully_shard_experts`` over dp (one expert of 4 a rank, with its factors), every decoder layer and the root HSDP
(the attention's adapters sharded over dp, replicated over ep). FSDP2's averaged
adapter gradients, gathered, against one process on the mean of the 4 ranks' losses; the codes unchanged; the
merged save from every rank against a one-process merge and save of the same adapters, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import automodel_plugins

from .test_ep_lora import _single

pytestmark = pytest.mark.distributed

FOUR = 4
SCENARIO = "ep_fsdp_experts_lora"


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory):
    """Its own launch of 4 ranks (2 CPU cores suffice): (results by rank, the launch's output folder)."""
    import torch.distributed as dist

    from .conftest import launch

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ep-lora-four-ranks")
    run = launch([SCENARIO], out, nproc=FOUR)
    results = []
    for rank in range(FOUR):
        path = out / "results" / f"{SCENARIO}.rank{rank}.json"
        if not path.is_file():
            pytest.fail(f"rank {rank} wrote no result for {SCENARIO!r}:\n{run.log_tail()}")
        results.append(json.loads(path.read_text()))
        assert "error" not in results[-1], results[-1]["error"]
    return results, out


def test_a_lora_step_on_the_experts_over_ep_and_fsdp2_equals_one_process(four_ranks) -> None:
    results, _ = four_ranks
    for rank, result in enumerate(results):
        assert all("2 of 4 experts" in v for v in result["applied"].values()), result["applied"]
        assert result["grad_names"] == result["single_grad_names"]
        assert (
            sum(".experts" in n for n in result["grad_names"]) == 2 * 2 * 2
        )  # lora_A/B, 2 tensors, 2 layers
        assert result["max_grad_rel_diff"] <= 1e-5, (rank, result["worst_grad"], result["max_grad_rel_diff"])
        assert abs(result["loss"] - result["single_loss"]) <= 1e-5 * result["single_loss"]
        assert result["codes_changed"] == [] and result["lora_left"] == 0, f"rank {rank}"


def test_the_plan_counts_the_factors_split_over_ep_and_dp(four_ranks) -> None:
    """``plan_memory(fsdp=2, ep=2, lora_target_parameters=...)``: each rank's LoRA bytes as measured (the experts'
    factors split over both dims, a quarter each; the attention's over dp)."""
    results, _ = four_ranks
    for rank, result in enumerate(results):
        assert result["planned_lora"]["params"] == result["measured_lora"], (rank, result["planned_lora"])


def test_the_merged_save_from_every_rank_is_the_one_process_save(four_ranks, tmp_path: Path) -> None:
    _, out = four_ranks
    model = _single(out, load_file(out / "ep-lora-fsdp" / "adapters.safetensors"))
    automodel_plugins.save_pretrained(automodel_plugins.merge_lora(model), tmp_path / "merged")
    got, want = out / "ep-lora-fsdp" / "merged", tmp_path / "merged"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in sorted(p.name for p in want.iterdir()):  # config.json too: its sub-configs' dtype included
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    # config.json names the dtype of the unquantized tensors the save wrote (the source's, here), everywhere.
    config = json.loads((got / "config.json").read_text())
    written = {
        str(t.dtype).removeprefix("torch.")
        for shard in got.glob("*.safetensors")
        for name, t in load_file(shard).items()
        if t.is_floating_point()
        and t.element_size() > 1
        and "scale" not in name  # FP8 codes and scales aside
    }
    assert written == {config["dtype"]}, written
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"]
