"""The hooks of the Qwen3-VL-MoE FP8 plugin (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B).

Qwen's FP8 releases store block FP8 (``weight_block_size [128, 128]``, ``weight_scale_inv``, dynamic
activations) under the runtime names, except the experts: one FP8 tensor per expert and projection, which
transformers 5 holds fused (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``). The BF16
releases store the fused experts transposed. ``experts.py`` tells the forms apart and returns the many-to-one
adapter; the rest (streaming dequant of each piece with its own scale, per-rank reads, rotary repair, the fused
loss with the router's load-balancing loss) is the host's. The router (``mlp.gate``, a bare ``[E, H]`` weight,
not an ``nn.Linear``) stays BF16, as ``modules_to_not_convert`` lists it. llm-compressor's compressed-tensors form
(FP8_DYNAMIC per-channel or FP8_BLOCK, ``weight_scale``) has the same per-expert keys and is read the same way. Imports of torch and transformers stay
inside the hooks: ``automodel-plugins list`` imports this module and must stay fast.
"""

from __future__ import annotations

from typing import Any

from automodel_plugins import Claim, Decline, claim_fp8_or_unquantized, hookimpl

MODEL_TYPE = "qwen3_vl_moe"


@hookimpl
def claim_config(config: Any) -> Claim | Decline | None:
    """Qwen3-VL-MoE, block FP8 or unquantized; other quantization methods are declined with the reason,
    other model types are not ours (``None``)."""
    if getattr(config, "model_type", None) != MODEL_TYPE:
        return None
    return claim_fp8_or_unquantized(config, "qwen3_vl_moe VLM (mixture of experts)")


@hookimpl
def state_dict_adapter(config: Any, checkpoint: Any) -> Any:
    """Runtime names and FP8 scales for every tensor (the host's default adapter); the experts in their
    on-disk form (per-expert, fused-transposed or fused-runtime: from the checkpoint's keys and shapes)."""
    from automodel_plugins import fp8_adapter_for
    from automodel_plugins.adapters.experts import ExpertShapes
    from automodel_plugins_qwen3_vl_moe_fp8.experts import (
        EXPERTS_FIELD,
        ExpertsAdapter,
        detect_form,
    )

    shapes = ExpertShapes.of(config, EXPERTS_FIELD)
    return ExpertsAdapter(fp8_adapter_for(config, checkpoint), detect_form(checkpoint, shapes), shapes)


@hookimpl
def post_materialize(model: Any, config: Any) -> None:
    """Recompute the text (M-RoPE) and vision (axial) rotary buffers now and at each rotary module's first
    call, since meta init leaves them as garbage that no checkpoint restores."""
    from automodel_plugins import repair_rotary

    repair_rotary(model)


@hookimpl
def forward_override(model: Any, config: Any) -> Any:
    """The stock forward, except that a labelled call computes its loss with the fused linear cross-entropy
    (plus the router's load-balancing loss when router logits are asked for, as stock)."""
    from automodel_plugins import vlm_fused_loss_forward

    return vlm_fused_loss_forward(model)
