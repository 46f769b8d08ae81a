"""FSDP2 scenario for ``_worker.py``: 2 ranks save an fp32 model loaded from the bfloat16 FP8 checkpoint in the
source's format (``quantization="source"``): the tensors are the source's dtypes, and ``config.json`` must name
them (the pytest side reads the files and loads them with stock transformers, ``dtype="auto"``)."""

from __future__ import annotations

from typing import Any

import torch

import automodel_plugins

CHECKPOINT = "per_tensor_untied"  # bfloat16, Mistral 3 (text_config and vision_config)
FOLDER = "fsdp-source-save-fp32"


def fsdp_source_save_dtype(ctx: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    path = ctx.checkpoint(CHECKPOINT)
    model = automodel_plugins.build_model(path, dtype=torch.float32)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    model.to_empty(device="cpu")
    automodel_plugins.load_weights(model, path)
    report = automodel_plugins.save_pretrained(model, ctx.out / FOLDER, quantization="source")
    return {
        "folder": FOLDER,
        "source": CHECKPOINT,
        "written_by_rank": report.bytes_written_by_rank,
        "held": str(model.config.dtype),
    }


SCENARIOS = {"fsdp_source_save_dtype": fsdp_source_save_dtype}
