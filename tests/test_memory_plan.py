"""``plan_memory`` / ``inspect --layout`` in one process: the layout grammar, agreement with ``inspect``'s own
totals, every FP8 code byte on exactly one rank, headers only. (Against measured ranks:
``tests/distributed/test_memory_plan_measured.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import LayoutError
from automodel_plugins.pipeline.load.memory_plan import Layout, plan_memory
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.header_only import write_header_only_checkpoint
from automodel_plugins.testing.tiny_models import tiny_mistral3_config

NOT_CONVERTED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
TEXT = {"hidden_size": 67, "intermediate_size": 72, "num_hidden_layers": 2, "vocab_size": 251}


def config():
    return tiny_mistral3_config(**TEXT, vision={"num_hidden_layers": 1}, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config())
    directory = tmp_path_factory.mktemp("plan") / "block"
    return write_fp8_checkpoint(model, directory, block_size=(16, 16), modules_to_not_convert=NOT_CONVERTED)


def test_layouts_parse_and_bad_ones_are_refused_naming_the_part() -> None:
    assert Layout.parse("fsdp=8,tp=2") == Layout(fsdp=8, ep=1, tp=2)
    assert Layout.parse("tp=2, ep=4").world_size == 8
    assert Layout(fsdp=2, ep=2, tp=2).coordinate(5) == (1, 0, 1)  # row-major, as init_device_mesh
    with pytest.raises(LayoutError, match="'dp=2'"):
        Layout.parse("fsdp=8,dp=2")
    with pytest.raises(LayoutError, match="tp=0"):
        Layout(tp=0)
    with pytest.raises(LayoutError, match="world_size 6"):
        plan_memory("unused", world_size=6, tp=4)


@pytest.mark.parametrize("dequantize", [True, False])
def test_one_rank_holds_what_inspect_says_the_load_holds(checkpoint: Path, dequantize: bool) -> None:
    load = automodel_plugins.describe_checkpoint(checkpoint)["load"]
    plan = plan_memory(checkpoint, dequantize=dequantize)
    expected = load["bytes_after_load"] if dequantize else load["bytes_after_load_fp8_resident"]
    assert plan.worst.weights == expected
    with Checkpoint.open(
        checkpoint
    ) as ckpt:  # one rank reads every stored byte the model uses (all of it here; the static activation
        # scales only when resident layers keep them)
        assert plan.worst.read == ckpt.total_nbytes() - sum(
            ckpt.info(k).nbytes for k in ckpt if k.endswith("activation_scale") and dequantize
        )


@pytest.mark.parametrize("layout", [{"fsdp": 2}, {"tp": 2}, {"fsdp": 2, "tp": 2}, {"fsdp": 4}])
def test_every_fp8_code_is_held_by_one_rank_of_a_replica_and_every_scale_by_all(checkpoint, layout) -> None:
    whole = plan_memory(checkpoint, dequantize=False).ranks[0].held
    plan = plan_memory(checkpoint, dequantize=False, **layout)
    assert sum(rank.held["fp8_codes"] for rank in plan.ranks) == whole["fp8_codes"]
    assert {rank.held["scales"] for rank in plan.ranks} == {whole["scales"]}
    assert plan.worst.total == max(rank.total for rank in plan.ranks)


def test_lora_counts_fp32_adapters_their_grads_and_two_adam_states(checkpoint: Path) -> None:
    plan = plan_memory(checkpoint, dequantize=False, lora_r=4, lora_targets=("q_proj",))
    # q_proj: text 2 layers of 67 -> 64 and vision 1 layer (tiny_mistral3_config's tower: hidden 32 -> 32).
    vision = config().vision_config.hidden_size
    params = 4 * 4 * (2 * (67 + 64) + (vision + vision))
    assert plan.worst.lora == {"params": params, "grads": params, "optimizer": 2 * params}


def test_a_header_only_checkpoint_is_planned_without_reading_data(tmp_path: Path, monkeypatch) -> None:
    write_header_only_checkpoint(
        config(), tmp_path / "h", block_size=(16, 16), modules_to_not_convert=NOT_CONVERTED
    )

    def no_data(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr(Checkpoint, "read", no_data)
    plan = plan_memory(tmp_path / "h", fsdp=2, dequantize=False)
    assert plan.worst.held["fp8_codes"] > 0


def test_inspect_layout_prints_each_rank_the_worst_and_the_total(checkpoint: Path, run_cli) -> None:
    result = run_cli(
        "inspect", str(checkpoint), "--layout", "fsdp=2,tp=2", "--fp8-resident", "--lora-r", "4", "--json"
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 4 and len(plan["ranks"]) == 4 and plan["lora"]["r"] == 4
    assert plan["dequantize"] is False and "Adam" in plan["lora"]["optimizer"]
    assert plan["total"]["total"] == sum(rank["total"] for rank in plan["ranks"])
    text = run_cli("inspect", str(checkpoint), "--layout", "fsdp=2")
    assert text.returncode == 0 and "worst rank" in text.stdout, text.stderr
    bad = run_cli("inspect", str(checkpoint), "--layout", "fsdp=2,pp=2")
    assert bad.returncode != 0 and "'pp=2'" in bad.stderr


def test_a_hub_repo_is_planned_from_its_headers_alone(checkpoint: Path, fake_hub) -> None:
    import struct

    fake_hub.add_directory("org/plan", checkpoint)
    fake_hub.reset_counters()
    remote = plan_memory("org/plan", fsdp=2, tp=2, dequantize=False, lora_r=4)
    local = plan_memory(checkpoint, fsdp=2, tp=2, dequantize=False, lora_r=4)
    assert [r.to_dict() for r in remote.ranks] == [r.to_dict() for r in local.ranks]
    with open(checkpoint / "model.safetensors", "rb") as fh:
        header = 8 + struct.unpack("<Q", fh.read(8))[0]
    served = {
        k.split(":", 1)[1]: n for k, n in fake_hub.bytes_served["files"].items() if k.startswith("org/plan:")
    }
    assert served["model.safetensors"] == header  # of the weights, only the header came
