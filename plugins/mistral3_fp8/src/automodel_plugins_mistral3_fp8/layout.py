"""The two on-disk key layouts of Mistral3 checkpoints, told apart by the checkpoint's own keys."""

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


def renames_for(layout: str) -> tuple[PrefixRename, ...]:
    return LEGACY_RENAMES if layout == "legacy" else ()
