"""FSDP2 scenarios for ``_worker.py``: the ``config.json`` that 2 ranks save names, in every sub-config, the dtype
of the model they save (an fp32 model from a bfloat16 checkpoint, and the bfloat16 one): a plain save, and a
save after ``merge_lora`` of LoRA on the FP8-resident q/v projections. The pytest side reads the files."""

from __future__ import annotations

from typing import Any

import torch

import automodel_plugins
from distributed import _checks
from distributed._peft_merge_config import with_lora

CHECKPOINT = "per_tensor_untied"  # bfloat16, Mistral 3 (text_config and vision_config)


def _sharded(ctx: Any, dtype: torch.dtype, *, lora: bool) -> Any:
    """build on meta (``dtype``) -> LoRA -> FSDP2 on every decoder layer and the root -> load, the adapters set
    as a one-process LoRA model's."""
    from torch.distributed.fsdp import fully_shard

    path = ctx.checkpoint(CHECKPOINT)
    model = automodel_plugins.build_model(path, dequantize=False, dtype=dtype)
    if lora:
        initial = {
            n: p.detach().clone()
            for n, p in with_lora(
                automodel_plugins.from_pretrained(path, dequantize=False, dtype=dtype)
            ).named_parameters()
            if "lora_" in n
        }
        model = with_lora(model)
    base = model.get_base_model() if lora else model
    for layer in base.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    if lora:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    _checks.local_value(param).copy_(_checks.local_part(param, initial[name]))
        model = automodel_plugins.merge_lora(model)
    return model


def fsdp_save_config(ctx: Any, dtype: torch.dtype, *, lora: bool) -> dict[str, Any]:
    model = _sharded(ctx, dtype, lora=lora)
    name = f"fsdp-save-config-{str(dtype).removeprefix('torch.')}{'-merged' if lora else ''}"
    automodel_plugins.save_pretrained(model, ctx.out / name, quantization="none")
    return {
        "folder": name,
        "held": {sub: str(getattr(model.config, sub).dtype) for sub in ("text_config", "vision_config")},
    }


SCENARIOS = {
    "fsdp_save_config_fp32": lambda ctx: fsdp_save_config(ctx, torch.float32, lora=False),
    "fsdp_save_config_bf16": lambda ctx: fsdp_save_config(ctx, torch.bfloat16, lora=False),
    "fsdp_save_config_fp32_merged": lambda ctx: fsdp_save_config(ctx, torch.float32, lora=True),
}
