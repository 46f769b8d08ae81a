"""``plan_memory`` / ``inspect --layout`` with LoRA on the fused experts (``target_parameters``) and on MLA attention,
on a tiny Mistral-Large-3-shaped checkpoint (native form: MLA attention, 4 fused experts a MoE layer), against
the adapters PEFT itself makes on the model the load builds. (Per-rank against measured bytes, FSDP2 and EP:
``tests/distributed/test_ep_lora.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
from mistral_native_moe import write_mla_moe_native

import automodel_plugins
from automodel_plugins.pipeline.load.memory_plan import LORA_TARGETS, plan_memory

EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
R = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mla_moe_native(tmp_path_factory.mktemp("plan-mla") / "native")


def peft_lora_bytes(path: Path, **targets) -> int:
    """fp32 bytes of every adapter PEFT makes on the model the load builds (on meta: shapes only)."""
    model = automodel_plugins.build_model(path, dequantize=False)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=R, **targets))
    return sum(p.numel() * 4 for n, p in adapted.named_parameters() if "lora_" in n)


def test_mla_attention_gets_adapters_by_default(checkpoint: Path) -> None:
    """MLA has no q_proj / v_proj (only the vision tower has): the default targets' MLA analogues (q_b_proj,
    kv_b_proj) count for the language model."""
    plan = plan_memory(checkpoint, dequantize=False, lora_r=R)
    assert plan.worst.lora["params"] == peft_lora_bytes(checkpoint, target_modules=list(LORA_TARGETS))
    mla = peft_lora_bytes(checkpoint, target_modules=["q_b_proj", "kv_b_proj"])
    vision_only = plan_memory(checkpoint, dequantize=False, lora_r=R, lora_targets=("q_proj", "v_proj"))
    assert mla > 0 and plan.worst.lora["params"] == vision_only.worst.lora["params"] + mla
    every = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    plan = plan_memory(checkpoint, dequantize=False, lora_r=R, lora_targets=every)
    assert plan.worst.lora["params"] == peft_lora_bytes(checkpoint, target_modules=every)


def test_expert_target_parameters_count_r_times_experts_times_both_sides(checkpoint: Path) -> None:
    one = plan_memory(checkpoint, dequantize=False, lora_r=R, lora_target_parameters=EXPERT_TARGETS)
    want = peft_lora_bytes(
        checkpoint, target_modules=list(LORA_TARGETS), target_parameters=list(EXPERT_TARGETS)
    )
    attention = plan_memory(checkpoint, dequantize=False, lora_r=R).worst.lora["params"]
    assert one.worst.lora["params"] == want > attention
    assert one.worst.lora["grads"] == want and one.worst.lora["optimizer"] == 2 * want
    assert one.to_dict()["lora"]["target_parameters"] == list(EXPERT_TARGETS)
    # FSDP2 shards them: the ranks' bytes sum to the whole; expert parallelism splits the experts' factors by
    # expert (each rank its 2 experts' of 4) and keeps the attention's whole on each rank
    fsdp = plan_memory(checkpoint, fsdp=2, dequantize=False, lora_r=R, lora_target_parameters=EXPERT_TARGETS)
    assert sum(rank.lora["params"] for rank in fsdp.ranks) == want
    ep = plan_memory(checkpoint, ep=2, dequantize=False, lora_r=R, lora_target_parameters=EXPERT_TARGETS)
    assert [rank.lora["params"] for rank in ep.ranks] == [attention + (want - attention) // 2] * 2
    both = plan_memory(
        checkpoint, fsdp=2, ep=2, dequantize=False, lora_r=R, lora_target_parameters=EXPERT_TARGETS
    )
    assert sum(rank.lora["params"] for rank in both.ranks) == 2 * attention + (want - attention)


def test_inspect_takes_lora_target_parameters(checkpoint: Path, run_cli) -> None:
    base = ["inspect", str(checkpoint), "--layout", "ep=2", "--fp8-resident", "--lora-r", str(R), "--json"]
    with_experts = run_cli(*base, "--lora-target-parameters", ",".join(EXPERT_TARGETS))
    assert with_experts.returncode == 0, with_experts.stderr
    plan = json.loads(with_experts.stdout)
    assert plan["lora"]["target_parameters"] == list(EXPERT_TARGETS)
    assert plan["lora"]["targets"] == list(LORA_TARGETS)
    without = json.loads(run_cli(*base).stdout)
    assert plan["worst_rank"]["lora"]["params"] > without["worst_rank"]["lora"]["params"] > 0
    text = run_cli(*base[:-1], "--lora-target-parameters", EXPERT_TARGETS[0])
    assert text.returncode == 0 and "mlp.experts.gate_up_proj" in text.stdout, text.stderr
