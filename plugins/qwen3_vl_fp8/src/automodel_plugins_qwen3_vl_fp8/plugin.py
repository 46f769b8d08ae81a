"""The hooks of the Qwen3-VL FP8 plugin: each names its model and hands the work to the host.

Qwen's FP8 releases (``Qwen/Qwen3-VL-*-FP8``) store ``nn.Linear`` weights as ``float8_e4m3fn`` with a
``weight_scale_inv`` grid of one scale per 128x128 block (fp32 or bf16), keep what
``quantization_config.modules_to_not_convert`` lists in BF16, quantize activations dynamically (no activation
scales on disk), and write keys in the runtime layout (``model.visual.*``, ``model.language_model.*``,
``lm_head.weight``). That is exactly what the host's default adapter reads, so this plugin implements no
``state_dict_adapter``. Imports of torch and transformers stay inside the hooks: ``automodel-plugins list``
imports this module and must stay fast.
"""

from __future__ import annotations

from typing import Any

from automodel_plugins import Claim, Decline, claim_fp8_or_unquantized, hookimpl

MODEL_TYPE = "qwen3_vl"
MOE_MODEL_TYPE = "qwen3_vl_moe"


@hookimpl
def claim_config(config: Any) -> Claim | Decline | None:
    """Qwen3-VL (dense), block FP8 or unquantized. The MoE variant (the sibling plugin ``qwen3_vl_moe_fp8``
    serves it) and other quantization methods are declined with the reason; other model types are not ours
    (``None``)."""
    model_type = getattr(config, "model_type", None)
    if model_type == MOE_MODEL_TYPE:
        return Decline(
            reason=f"{MOE_MODEL_TYPE} (mixture of experts): only the dense {MODEL_TYPE} is served here; "
            "the qwen3_vl_moe_fp8 plugin (automodel-plugins-qwen3-vl-moe-fp8) serves it"
        )
    if model_type != MODEL_TYPE:
        return None
    return claim_fp8_or_unquantized(config, "qwen3_vl VLM")


@hookimpl
def post_materialize(model: Any, config: Any) -> None:
    """Recompute the text (M-RoPE) and vision (axial) rotary buffers now and at each rotary module's first
    call, since meta init leaves them as garbage that no checkpoint restores."""
    from automodel_plugins import repair_rotary

    repair_rotary(model)


@hookimpl
def forward_override(model: Any, config: Any) -> Any:
    """The stock forward, except that a labelled call computes its loss with the fused linear cross-entropy."""
    from automodel_plugins import vlm_fused_loss_forward

    return vlm_fused_loss_forward(model)
