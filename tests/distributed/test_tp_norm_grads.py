"""Under ``parallelize_fp8`` the replicated parameters that see only this rank's shard of the activations
(Qwen3's per-head ``q_norm`` / ``k_norm``, between the column-wise q/k and the row-wise o projections) get their
whole gradient with no user all-reduce: 2 gloo ranks on the same micro-batches against one process (fp32), after
one backward and after two accumulated into ``.grad``; under LoRA (frozen base) the adapters' gradients."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("tp_norm_grads_full", "tp_norm_grads_lora", "tp_norm_grads_found")
TOLERANCE = 1e-4
"""Relative to the largest one-process gradient: fp32 sums in another order (the experts-TP tests' bound)."""
NORMS = sorted(
    f"model.language_model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("k_norm", "q_norm")
)


def test_a_full_fine_tune_gets_every_gradient_whole_also_accumulated(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("tp_norm_grads_full")):
        assert result["grad_names"] == result["single_grad_names"]
        norms = [n for n in result["grad_names"] if n.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(norms) == len(NORMS), norms
        for step, diffs in enumerate(result["rel_diffs"]):  # after 1, then 2 accumulated micro-batches
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] <= TOLERANCE, (rank, step, worst, diffs[worst])
        assert result["applied_sum"] == NORMS, rank
        assert result["grad_hooks"] == len(NORMS), "one gradient sum per norm weight, however many forwards"


def test_under_lora_the_frozen_norms_take_no_hook_and_the_adapters_are_whole(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("tp_norm_grads_lora")):
        assert result["applied_sum"] == [f"base_model.model.{n}" for n in NORMS], rank
        assert result["trainable"] and all("lora_" in n for n in result["trainable"])
        assert result["grad_names"] == result["single_grad_names"] == result["trainable"]
        assert result["grad_hooks"] == 0, "frozen parameters need no gradient sum"
        for step, diffs in enumerate(result["rel_diffs"]):
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] <= TOLERANCE, (rank, step, worst, diffs[worst])


def test_found_from_the_plan_not_by_name(distributed_run) -> None:
    """Only modules between a column-wise and a row-wise split of one parent: Qwen's attention norms; Mistral 3's
    and Mistral 4's plans put none there (their MLP's activation has no parameters)."""
    found = distributed_run.ranks("tp_norm_grads_found")[0]["found"]
    assert found["ep_qwen3_vl_moe"] == NORMS
    assert found["ep_mistral4_fused"] == [] and found["mistral3"] == []
