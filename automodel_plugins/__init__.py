"""automodel-plugins: compose plugin overrides (FP8 loading, rotary repair, fused loss) onto stock HF models.

The light names (markers, ``Claim``, errors) import eagerly; the loading API imports torch and transformers
on first use, so ``automodel-plugins list`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automodel_plugins.claim import Claim, Decline
from automodel_plugins.errors import (
    AmbiguousClaimError,
    AutomodelPluginsError,
    CheckpointError,
    ConfigError,
    NoPluginClaimError,
    PluginError,
    UnknownPluginError,
)
from automodel_plugins.markers import PROJECT_NAME, hookimpl, hookspec

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "automodel_plugins.pipeline",
    "build_model": "automodel_plugins.pipeline",
    "load_weights": "automodel_plugins.pipeline",
    "Composition": "automodel_plugins.pipeline",
    "StateDictAdapter": "automodel_plugins.adapter",
    "TensorSource": "automodel_plugins.adapter",
    "Fp8StateDictAdapter": "automodel_plugins.adapter",
    "Checkpoint": "automodel_plugins.checkpoint",
    "get_registry": "automodel_plugins.registry",
    "Registry": "automodel_plugins.registry",
}

if TYPE_CHECKING:
    from automodel_plugins.adapter import Fp8StateDictAdapter, StateDictAdapter, TensorSource
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline import Composition, build_model, from_pretrained, load_weights
    from automodel_plugins.registry import Registry, get_registry


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'automodel_plugins' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "PROJECT_NAME",
    "AmbiguousClaimError",
    "AutomodelPluginsError",
    "Checkpoint",
    "CheckpointError",
    "Claim",
    "Composition",
    "ConfigError",
    "Decline",
    "Fp8StateDictAdapter",
    "NoPluginClaimError",
    "PluginError",
    "Registry",
    "StateDictAdapter",
    "TensorSource",
    "UnknownPluginError",
    "build_model",
    "from_pretrained",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_weights",
]
