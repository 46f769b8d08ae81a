"""The fused loss with ``lm_head`` under FSDP2 hooks of its own (issue 21 item 3).

accelerate 1.16's ``fsdp2_prepare_model`` wraps ``[final_norm, lm_head]`` as a group of their own
(``reshard_after_forward=False``): the forward override used to see hooks on ``lm_head`` and fall back to the
stock loss with full logits. Now the loss runs as ``lm_head``'s forward, through FSDP2's hooks, in that layout
and in every one ``fully_shard`` reaches (``lm_head`` alone or with the norm, resharded after the forward or
not). Both ranks take the same batch, so the averaged gradients are the single process's: loss, every
gradient and the weights after two SGD steps are checked against the stock forward (transformers' loss over
full logits) in one process.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

SCENARIOS = ("accelerate_head", "fsdp_head_layouts")
TOLERANCE = 2e-5  # fp32: the fused op sums the log-sum-exp in chunks, stock over the whole row


def check_fused_and_equal(rank: int, name: str, facts: dict) -> None:
    where = f"rank {rank}, {name}"
    assert facts["had_logits"] == [False, False], f"{where}: the fused loss did not run: {facts['warnings']}"
    assert not [w for w in facts["warnings"] if "lm_head" in w], f"{where}: {facts['warnings']}"
    for got, want in zip(facts["losses"], facts["reference_losses"], strict=True):
        assert abs(got - want) <= TOLERANCE, f"{where}: loss {got} vs stock {want}"
    assert facts["losses"][1] < facts["losses"][0], f"{where}: the step must lower the loss"
    assert facts["grad_names"] == facts["reference_grad_names"], where
    assert facts["head_parameter"] in facts["grad_names"], where
    assert facts["head_grad_diff"] <= TOLERANCE, f"{where}: lm_head gradient off by {facts['head_grad_diff']}"
    assert facts["max_grad_diff"] <= TOLERANCE, f"{where}: a gradient is off by {facts['max_grad_diff']}"
    assert facts["max_param_diff"] <= TOLERANCE, f"{where}: updated weights off by {facts['max_param_diff']}"


def test_accelerate_layout_keeps_the_fused_loss(distributed_run) -> None:
    for rank, result in enumerate(distributed_run.ranks("accelerate_head")):
        for name, facts in result.items():
            check_fused_and_equal(rank, name, facts)
            assert facts["head_sharded_at_rest"], f"rank {rank}, {name}: lm_head.weight is not sharded"
        # accelerate's own tail groups, none resharded after the forward
        assert result["vlm_untied"]["groups"] == [{"modules": ["lm_head"], "reshard_after_forward": False}]
        assert result["vlm_tied"]["head_parameter"] == "model.language_model.embed_tokens.weight"
        assert result["vlm_tied"]["groups"] == [
            {"modules": ["lm_head", "model.language_model.embed_tokens"], "reshard_after_forward": False}
        ]
        assert result["text_only"]["groups"] == [
            {"modules": ["lm_head", "model.norm"], "reshard_after_forward": False}
        ]


@pytest.mark.parametrize("layout", ["head", "head_reshard", "norm_head", "norm_head_reshard"])
def test_head_layouts_reached_with_fully_shard_keep_the_fused_loss(distributed_run, layout: str) -> None:
    modules = ["lm_head", "model.language_model.norm"] if layout.startswith("norm_head") else ["lm_head"]
    for rank, result in enumerate(distributed_run.ranks("fsdp_head_layouts")):
        facts = result[layout]
        check_fused_and_equal(rank, layout, facts)
        assert facts["groups"] == [
            {"modules": modules, "reshard_after_forward": layout.endswith("_reshard")}
        ], f"rank {rank}"


def test_head_whose_fsdp_output_dtype_would_round_the_loss_falls_back_with_a_warning(distributed_run) -> None:
    """``MixedPrecisionPolicy(output_dtype=bf16)`` on ``lm_head``'s unit casts whatever it returns: the stock
    forward runs (logits cast as stock's), with the warning saying why."""
    for rank, result in enumerate(distributed_run.ranks("fsdp_head_layouts")):
        facts = result["head_output_bf16"]
        assert facts["had_logits"] == [True], f"rank {rank}"
        assert any("casts its output to torch.bfloat16" in w for w in facts["warnings"]), (
            f"rank {rank}: {facts}"
        )
