"""automodel-plugins: compose plugin overrides (FP8 loading, rotary repair, fused loss) onto stock HF models.

The light names (markers, ``Claim``, errors) import eagerly; everything else, the loading API and the helpers
a plugin's hooks call, imports torch and transformers on first use, so ``automodel-plugins list`` stays fast.

Where things live (one folder per stage of the data path)::

    sources/     what a checkpoint path names, and its config
    checkpoint/  safetensors headers, the shard index, the lazy reader
    fp8/         FP8 formats, scales, decode (dequantize) and encode (quantize)
    adapters/    model tensor names <-> checkpoint keys (and FP8 scales)
    pipeline/    load (plan, stream) and save (plan, write, convert), describe
    model/       the stock class on meta, tensor placement per rank, rotary repair, forward override
    registry/    hook specs, plugin discovery and isolation, claims
    ops/         fused linear cross-entropy
    cli/         the automodel-plugins command
    testing/     the plugin author's kit
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from automodel_plugins.errors import (
    AmbiguousClaimError,
    AutomodelPluginsError,
    CheckpointError,
    ConfigError,
    FrozenFp8WeightError,
    NoPluginClaimError,
    NotQuantizedError,
    PluginError,
    UnknownPluginError,
)
from automodel_plugins.registry.claims import Claim, Decline
from automodel_plugins.registry.markers import PROJECT_NAME, hookimpl, hookspec

__version__ = "0.2.0"

_LAZY = {
    # loading
    "from_pretrained": "automodel_plugins.pipeline.load",
    "build_model": "automodel_plugins.pipeline.load",
    "load_weights": "automodel_plugins.pipeline.load",
    # transformers' Auto classes, routed through the registry
    "AutoModel": "automodel_plugins.auto",
    "AutoModelForCausalLM": "automodel_plugins.auto",
    "AutoModelForImageTextToText": "automodel_plugins.auto",
    # saving
    "save_pretrained": "automodel_plugins.pipeline.save",
    "SaveReport": "automodel_plugins.pipeline.save",
    "convert_checkpoint": "automodel_plugins.pipeline.convert",
    "Composition": "automodel_plugins.pipeline.composition",
    "LoadReport": "automodel_plugins.pipeline.stream",
    "describe_checkpoint": "automodel_plugins.pipeline.describe",
    "load_config": "automodel_plugins.sources.config",
    "Checkpoint": "automodel_plugins.checkpoint.reader",
    "get_registry": "automodel_plugins.registry.manager",
    "Registry": "automodel_plugins.registry.manager",
    # what a plugin's hooks return or call
    "StateDictAdapter": "automodel_plugins.adapters.base",
    "TensorSource": "automodel_plugins.adapters.base",
    "Piece": "automodel_plugins.adapters.base",
    "stacked_boxes": "automodel_plugins.adapters.pieces",
    "Fp8StateDictAdapter": "automodel_plugins.adapters.fp8",
    "PrefixRename": "automodel_plugins.adapters.fp8",
    "PrefixRenames": "automodel_plugins.adapters.fp8",
    "fp8_adapter_for": "automodel_plugins.adapters.fp8",
    "claim_fp8_or_unquantized": "automodel_plugins.fp8.quantization",
    "repair_rotary": "automodel_plugins.model.rotary",
    "fused_loss_forward": "automodel_plugins.model.forward",
    "vlm_fused_loss_forward": "automodel_plugins.model.forward",
    # FP8-resident layers (dequantize=False) and LoRA on them (the last three import peft)
    "Fp8Linear": "automodel_plugins.model.fp8_linear",
    "Fp8Experts": "automodel_plugins.model.fp8_experts",
    "Fp8LoraLinear": "automodel_plugins.model.fp8_lora",
    "dequantize_lora_bases": "automodel_plugins.model.fp8_lora",
    "merge_lora": "automodel_plugins.model.fp8_lora",
    "register_fp8_lora": "automodel_plugins.model.fp8_lora",
}

if TYPE_CHECKING:
    from automodel_plugins.adapters.base import Piece, StateDictAdapter, TensorSource
    from automodel_plugins.adapters.fp8 import (
        Fp8StateDictAdapter,
        PrefixRename,
        PrefixRenames,
        fp8_adapter_for,
    )
    from automodel_plugins.adapters.pieces import stacked_boxes
    from automodel_plugins.auto import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from automodel_plugins.checkpoint.reader import Checkpoint
    from automodel_plugins.fp8.quantization import claim_fp8_or_unquantized
    from automodel_plugins.model.forward import fused_loss_forward, vlm_fused_loss_forward
    from automodel_plugins.model.fp8_experts import Fp8Experts
    from automodel_plugins.model.fp8_linear import Fp8Linear
    from automodel_plugins.model.fp8_lora import (
        Fp8LoraLinear,
        dequantize_lora_bases,
        merge_lora,
        register_fp8_lora,
    )
    from automodel_plugins.model.rotary import repair_rotary
    from automodel_plugins.pipeline.composition import Composition
    from automodel_plugins.pipeline.convert import convert_checkpoint
    from automodel_plugins.pipeline.describe import describe_checkpoint
    from automodel_plugins.pipeline.load import build_model, from_pretrained, load_weights
    from automodel_plugins.pipeline.save import SaveReport, save_pretrained
    from automodel_plugins.pipeline.stream import LoadReport
    from automodel_plugins.registry.manager import Registry, get_registry
    from automodel_plugins.sources.config import load_config


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'automodel_plugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "PROJECT_NAME",
    "AmbiguousClaimError",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutomodelPluginsError",
    "Checkpoint",
    "CheckpointError",
    "Claim",
    "Composition",
    "ConfigError",
    "Decline",
    "Fp8Experts",
    "Fp8Linear",
    "Fp8LoraLinear",
    "Fp8StateDictAdapter",
    "FrozenFp8WeightError",
    "LoadReport",
    "NoPluginClaimError",
    "NotQuantizedError",
    "Piece",
    "PluginError",
    "PrefixRename",
    "PrefixRenames",
    "Registry",
    "SaveReport",
    "StateDictAdapter",
    "TensorSource",
    "UnknownPluginError",
    "build_model",
    "claim_fp8_or_unquantized",
    "convert_checkpoint",
    "dequantize_lora_bases",
    "describe_checkpoint",
    "fp8_adapter_for",
    "from_pretrained",
    "fused_loss_forward",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_config",
    "load_weights",
    "merge_lora",
    "register_fp8_lora",
    "repair_rotary",
    "save_pretrained",
    "stacked_boxes",
    "vlm_fused_loss_forward",
]
