"""The on-disk key layouts of Mistral3 checkpoints, told apart by the checkpoint's own keys.

A VLM (``Mistral3ForConditionalGeneration``) is stored in the legacy layout (``language_model.model.*``) or the
runtime one (``model.language_model.*``); a text-only Ministral 3 (``Ministral3ForCausalLM``: Devstral 2 123B) is
stored under its module tree's names (``model.layers.*``, ``lm_head.weight``), which is its runtime layout.
"""

from __future__ import annotations

from collections.abc import Iterable

from automodel_plugins.adapters import PrefixRename
from automodel_plugins.errors import CheckpointError

LEGACY_RENAMES = (
    PrefixRename(model="lm_head.", checkpoint="language_model.lm_head."),
    PrefixRename(model="model.language_model.", checkpoint="language_model.model."),
    PrefixRename(model="model.vision_tower.", checkpoint="vision_tower."),
    PrefixRename(model="model.multi_modal_projector.", checkpoint="multi_modal_projector."),
)
"""Ministral 3, Devstral Small 2, and what ``save_pretrained`` writes in transformers 5.x."""

_LEGACY_MARKERS = ("language_model.model.", "vision_tower.", "multi_modal_projector.")
_RUNTIME_MARKERS = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.")
_TEXT_MARKERS = ("model.layers.", "model.embed_tokens.")


def detect_layout(keys: Iterable[str], *, where: object = None) -> str:
    """``"legacy"`` or ``"runtime"`` (Mistral Medium 3.5: keys already match the module tree).

    Decided by the keys alone, never by a layer count; a checkpoint mixing both is refused.
    """
    legacy = runtime = None
    for key in keys:
        if legacy is None and key.startswith(_LEGACY_MARKERS):
            legacy = key
        if runtime is None and key.startswith(_RUNTIME_MARKERS):
            runtime = key
    if legacy and runtime:
        raise CheckpointError(
            f"checkpoint mixes the legacy ({legacy!r}) and runtime ({runtime!r}) key layouts", path=where
        )
    if not (legacy or runtime):
        raise CheckpointError(
            "no Mistral3 key found (expected language_model.model.* or model.language_model.*)", path=where
        )
    return "legacy" if legacy else "runtime"


def check_text_only_layout(
    keys: Iterable[str], *, where: object = None, text_type: str = "ministral3"
) -> str:
    """``"runtime"`` for a text-only Ministral 3 or Mistral 4 (``text_type``) checkpoint (``model.layers.*``);
    a VLM's keys under a text-only config are refused by name, rather than left to strict key accounting."""
    text = vlm = None
    for key in keys:
        if text is None and key.startswith(_TEXT_MARKERS):
            text = key
        if vlm is None and key.startswith(_LEGACY_MARKERS + _RUNTIME_MARKERS):
            vlm = key
    if vlm is not None:
        raise CheckpointError(
            f"config.json declares a text-only {text_type} model, but the checkpoint holds a Mistral3 VLM's keys "
            f"({vlm!r}); load it with the VLM's config (model_type mistral3)",
            path=where,
        )
    if text is None:
        raise CheckpointError(
            f"no {text_type} text key found (expected model.layers.* and model.embed_tokens.*)", path=where
        )
    return "runtime"


def renames_for(layout: str) -> tuple[PrefixRename, ...]:
    return LEGACY_RENAMES if layout == "legacy" else ()
