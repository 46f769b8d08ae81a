"""FSDP2 scenario for ``_worker.py``: ``merge_lora`` of a sharded FP8-resident model with LoRA on some layers only
(q_proj, v_proj) keeps ``quantization_config`` truthful: the sharded merge (each rank its own rows) lists exactly
the merged layers in ``modules_to_not_convert`` and the others stay FP8, on every rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import automodel_plugins
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.fp8_linear import Fp8Linear
from distributed import _checks

TARGETS = ["q_proj", "v_proj"]


def with_lora(model: Any) -> Any:
    import peft

    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def fsdp_partial_merge(ctx: Any, checkpoint: str) -> dict[str, Any]:
    """build on meta -> LoRA -> FSDP2 on every decoder layer and the root -> to_empty -> load_weights, the
    adapters of a one-process LoRA model copied in -> ``merge_lora``; the config and which layers stay FP8."""
    from torch.distributed.fsdp import fully_shard

    path = ctx.checkpoint(checkpoint)
    initial = {
        n: p.detach().clone()
        for n, p in with_lora(automodel_plugins.from_pretrained(path, dequantize=False)).named_parameters()
        if "lora_" in n
    }
    model = with_lora(automodel_plugins.build_model(path, dequantize=False))
    for layer in model.get_base_model().model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
    merged = automodel_plugins.merge_lora(model)
    quantization = quantization_dict(merged.config) or {}
    return {
        "modules_to_not_convert": quantization.get("modules_to_not_convert"),
        "fp8_left": [n for n, m in merged.named_modules() if isinstance(m, Fp8Linear)],
        "merged_sharded": [
            n
            for n, m in merged.named_modules()
            if type(m) is nn.Linear and "language_model" in n and _checks.is_dtensor(m.weight)
        ],
    }


SCENARIOS = {
    "fsdp_merge_config_per_tensor": lambda ctx: fsdp_partial_merge(ctx, "per_tensor_untied"),
    "fsdp_merge_config_block": lambda ctx: fsdp_partial_merge(ctx, "block_untied"),
}
