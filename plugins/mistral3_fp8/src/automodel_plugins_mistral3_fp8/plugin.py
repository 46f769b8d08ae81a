"""The four hooks of the Mistral3 FP8 plugin, each a few lines over the host's shared machinery.

What is Mistral3's own: which configs it serves (a ``mistral3`` VLM whose text model is ``ministral3``:
Ministral 3, Devstral Small 2, Mistral Medium 3.5; the text-only ``ministral3`` of ``Ministral3ForCausalLM``:
Devstral 2 123B; the MoE generation, a ``mistral3`` VLM whose text model is ``mistral4`` (Mistral Small 4), and
the text-only ``mistral4``), their on-disk key layouts (``layout.py``) and where a Mistral 4 layer's experts
are on disk (``experts.py``: fused with one scale per expert or a block grid, or per expert). FP8 dequant,
streaming, rotary repair and the fused loss are the host's. Imports of torch and transformers stay inside the
hooks: ``automodel-plugins list`` imports this module and must stay fast.
"""

from __future__ import annotations

from typing import Any

from automodel_plugins import Claim, Decline, claim_fp8_or_unquantized, hookimpl

MODEL_TYPE = "mistral3"
TEXT_MODEL_TYPE = "ministral3"
MOE_TEXT_MODEL_TYPE = "mistral4"
TEXT_MODEL_TYPES = (TEXT_MODEL_TYPE, MOE_TEXT_MODEL_TYPE)
_TEXT_ONLY = {
    TEXT_MODEL_TYPE: "ministral3 text model (Ministral3ForCausalLM)",
    MOE_TEXT_MODEL_TYPE: "mistral4 text model (Mistral4ForCausalLM, mixture of experts)",
}


@hookimpl
def claim_config(config: Any) -> Claim | Decline | None:
    """Mistral3 VLMs with a Ministral3 or Mistral4 (MoE) text model, and text-only Ministral3 and Mistral4
    models, FP8 or unquantized. Other model types are not ours (``None``); Mistral Small 3 (a ``mistral``
    text model) and other quantization methods are declined with the reason, since those users are the ones
    who ask why."""
    model_type = getattr(config, "model_type", None)
    if model_type in _TEXT_ONLY:
        return claim_fp8_or_unquantized(config, _TEXT_ONLY[model_type])
    if model_type != MODEL_TYPE:
        return None
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if text_type not in TEXT_MODEL_TYPES:
        served = " or ".join(repr(t) for t in TEXT_MODEL_TYPES)
        return Decline(reason=f"mistral3 VLM with text model {text_type!r}: only {served} is served")
    return claim_fp8_or_unquantized(config, f"mistral3 VLM with a {text_type} text model")


@hookimpl
def state_dict_adapter(config: Any, checkpoint: Any) -> Any:
    """Legacy, runtime or Mistral-native key layout (from the checkpoint's keys), FP8 scales under any accepted
    name; for a Mistral 4 text model, the experts in their on-disk form (fused or per expert; native: per
    expert, ``experts.E.w1/w2/w3``)."""
    from automodel_plugins import fp8_adapter_for
    from automodel_plugins.adapters.experts import ExpertShapes
    from automodel_plugins_mistral3_fp8.experts import (
        EXPERTS_FIELD,
        Mistral4ExpertsAdapter,
        detect_form,
    )
    from automodel_plugins_mistral3_fp8.layout import check_text_only_layout, detect_layout, renames_for
    from automodel_plugins_mistral3_fp8.native import MistralNativeAdapter, is_native

    if is_native(checkpoint.keys()):
        base = fp8_adapter_for(config, checkpoint, layout="native")
        return MistralNativeAdapter(
            checkpoint,
            block_size=base.block_size,
            modules_to_not_convert=base.modules_to_not_convert,
            fp8_dtype=base.fp8_dtype,
            config=config,
        )
    model_type = getattr(config, "model_type", None)
    if model_type in _TEXT_ONLY:
        layout = check_text_only_layout(checkpoint.keys(), where=checkpoint.directory, text_type=model_type)
    else:
        layout = detect_layout(checkpoint.keys(), where=checkpoint.directory)
    adapter = fp8_adapter_for(config, checkpoint, renames=renames_for(layout), layout=layout)
    if config.get_text_config().model_type != MOE_TEXT_MODEL_TYPE:
        return adapter
    form = detect_form(list(checkpoint.keys()), where=checkpoint.directory)
    return Mistral4ExpertsAdapter(adapter, form, ExpertShapes.of(config, EXPERTS_FIELD))


@hookimpl
def post_materialize(model: Any, config: Any) -> None:
    """Recompute the text (and, for a VLM, vision) rotary buffers now, and again whenever a user's
    ``to_empty`` re-creates them, since meta init leaves them as garbage that no checkpoint restores."""
    from automodel_plugins import repair_rotary

    repair_rotary(model)


@hookimpl
def forward_override(model: Any, config: Any) -> Any:
    """The stock forward, except that a labelled call computes its loss with the fused linear cross-entropy
    from the final hidden states, never materializing ``[tokens, vocab]`` logits for the loss."""
    from automodel_plugins import vlm_fused_loss_forward

    return vlm_fused_loss_forward(model)
