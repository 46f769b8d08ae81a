"""automodel-plugins: compose plugin overrides (FP8 loading, rotary repair, fused loss) onto stock HF models.

The light names (markers, ``Claim``, errors) import eagerly; everything else, the loading API and the helpers
a plugin's hooks call, imports torch and transformers on first use, so ``automodel-plugins list`` stays fast.

Where things live, one folder per stage of the data path, bottom floor first: a module imports only from
its own floor or the floors below it, and no two modules import each other (``tests/test_package_shape.py``)::

    ``errors``, ``progress``, ``_version``   the typed errors, the progress-bar switch, the version
    registry/    hook specs, plugin discovery and isolation, claims (runs no data-path code)
    sources/     what a checkpoint path or hub repo id names, the hub options, its config
    checkpoint/  safetensors headers, the shard index, the lazy reader, the streaming writer
    fp8/         FP8 formats, scales, decode (dequantize) and encode (quantize)
    adapters/    model tensor names <-> checkpoint keys (and FP8 scales)
    ops/         fused linear cross-entropy
    model/       the stock class on meta, tensor placement per rank, rotary repair, forward override,
                 FP8-resident layers
    pipeline/    the load side (plan, stream) and the save side (plan, write, convert), the readers both share
    cli/         the automodel-plugins command       } the top floor, with this module, which re-exports
    testing/     the plugin author's kit             } the public names of every floor below
    integrations/  trainers built on transformers (TRL), each importing its own tool
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from automodel_plugins._version import __version__ as __version__
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

_LAZY = {
    # loading
    "from_pretrained": "automodel_plugins.pipeline.load.load",
    "build_model": "automodel_plugins.pipeline.load.load",
    "load_weights": "automodel_plugins.pipeline.load.load",
    # transformers' Auto classes, routed through the registry
    "AutoModel": "automodel_plugins.pipeline.load.auto",
    "AutoModelForCausalLM": "automodel_plugins.pipeline.load.auto",
    "AutoModelForImageTextToText": "automodel_plugins.pipeline.load.auto",
    # saving
    "save_pretrained": "automodel_plugins.pipeline.save.save",
    "SaveReport": "automodel_plugins.pipeline.save.save",
    "convert_checkpoint": "automodel_plugins.pipeline.save.convert",
    "Composition": "automodel_plugins.pipeline.composition",
    "LoadReport": "automodel_plugins.pipeline.load.report",
    "describe_checkpoint": "automodel_plugins.pipeline.load.describe",
    "plan_memory": "automodel_plugins.pipeline.load.memory_plan",
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
    "requantize_state_dict": "automodel_plugins.model.requantize",
    # tensor parallelism from the model's tp_plan (FP8-resident layers included)
    "parallelize_fp8": "automodel_plugins.model.tensor_parallel",
    "tensor_parallel_plan": "automodel_plugins.model.tensor_parallel",
    # expert parallelism from the model's ep_plan (FP8-resident experts included)
    "parallelize_experts": "automodel_plugins.model.expert_parallel",
    "expert_parallel_plan": "automodel_plugins.model.expert_parallel",
    "fully_shard_experts": "automodel_plugins.model.expert_parallel",
    # expert tensor parallelism: every expert's slice of the intermediate dim a rank (FP8-resident experts)
    "parallelize_experts_tp": "automodel_plugins.model.expert_tensor_parallel",
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
    from automodel_plugins.checkpoint.reader import Checkpoint
    from automodel_plugins.fp8.quantization import claim_fp8_or_unquantized
    from automodel_plugins.model.expert_parallel import (
        expert_parallel_plan,
        fully_shard_experts,
        parallelize_experts,
    )
    from automodel_plugins.model.expert_tensor_parallel import parallelize_experts_tp
    from automodel_plugins.model.forward import fused_loss_forward, vlm_fused_loss_forward
    from automodel_plugins.model.fp8_experts import Fp8Experts
    from automodel_plugins.model.fp8_linear import Fp8Linear
    from automodel_plugins.model.fp8_lora import (
        Fp8LoraLinear,
        dequantize_lora_bases,
        merge_lora,
        register_fp8_lora,
    )
    from automodel_plugins.model.requantize import requantize_state_dict
    from automodel_plugins.model.rotary import repair_rotary
    from automodel_plugins.model.tensor_parallel import parallelize_fp8, tensor_parallel_plan
    from automodel_plugins.pipeline.composition import Composition
    from automodel_plugins.pipeline.load.auto import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )
    from automodel_plugins.pipeline.load.describe import describe_checkpoint
    from automodel_plugins.pipeline.load.load import build_model, from_pretrained, load_weights
    from automodel_plugins.pipeline.load.memory_plan import plan_memory
    from automodel_plugins.pipeline.load.report import LoadReport
    from automodel_plugins.pipeline.save.convert import convert_checkpoint
    from automodel_plugins.pipeline.save.save import SaveReport, save_pretrained
    from automodel_plugins.registry.manager import Registry, get_registry
    from automodel_plugins.sources.config import load_config


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'automodel_plugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(
    [
        "PROJECT_NAME",
        "AmbiguousClaimError",
        "AutomodelPluginsError",
        "CheckpointError",
        "Claim",
        "ConfigError",
        "Decline",
        "FrozenFp8WeightError",
        "NoPluginClaimError",
        "NotQuantizedError",
        "PluginError",
        "UnknownPluginError",
        "hookimpl",
        "hookspec",
        *_LAZY,
    ]
)
